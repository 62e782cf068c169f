"""The big-model paths on CPU with tiny models: bfloat16, accelerate dispatch with offloaded layers, bitsandbytes.

bitsandbytes (the `dev` extra) runs 4-bit and 8-bit layers on CPU, so every path here runs in CI.
"""

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from cna.batching import pad_batch, position_ids
from cna.cache import statistics_key
from cna.circuit import Circuit, Neuron
from cna.discovery import collect_statistics, residual_direction
from cna.errors import CnaError, ConfigError
from cna.export import baked_weights, export_baked_model
from cna.generation import generate
from cna.hooks import Hook, attached, map_input, read_input
from cna.interventions import DirectionAblation, NeuronScale, SteeringVector
from cna.models import ArchitectureAdapter, LoadedModel, ModelSpec, activation_identity, load_model
from cna.tiny import tiny_tokenizer
from conftest import random_prompts, tiny_model

PROMPTS = random_prompts(10, seed=21)
BATCH = pad_batch(random_prompts(4, seed=22), pad_token_id=0, side="left")
GREEDY = dict(pad_token_id=0, eos_token_id=[2], max_new_tokens=8, progress=False)
# Layer 1 and the embedding live on disk: the embedding's weight is `meta`, layer 1's down_proj too.
OFFLOADED = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def circuit_on(adapter: ArchitectureAdapter) -> Circuit:
    """Eight neurons in every layer."""
    neurons = [Neuron(layer, j, 1.0, 1.0, 0.0) for layer in range(adapter.n_layers) for j in range(3, 67, 8)]
    return Circuit("tiny", "cna", neurons, adapter.n_layers, adapter.neurons_per_layer)


def logits(model) -> torch.Tensor:
    ids, mask = BATCH
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def statistics(adapter, **options):
    return collect_statistics(adapter, PROMPTS, pad_token_id=0, batch_size=4, progress=False, **options)


def loaded(folder, **spec) -> LoadedModel:
    return load_model(ModelSpec(name="org/tiny", path=str(folder), device="cpu", **spec))


@pytest.fixture(scope="module")
def bf16(tiny_folder) -> LoadedModel:
    return loaded(tiny_folder, dtype="bfloat16")


@pytest.fixture(scope="module")
def offloaded(tiny_folder, tmp_path_factory) -> LoadedModel:
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16, device_map=OFFLOADED,
                                                 offload_folder=tmp_path_factory.mktemp("offload")).eval()
    return LoadedModel(model, tiny_tokenizer(), ArchitectureAdapter(model), ModelSpec("org/tiny"), str(tiny_folder))


def test_offloaded_layers_are_really_offloaded_and_inputs_go_to_the_execution_device(offloaded):
    adapter = offloaded.adapter
    assert offloaded.model.get_input_embeddings().weight.device.type == "meta"
    assert adapter.neuron_sites[1].weight.device.type == "meta"
    assert adapter.input_device == torch.device("cpu")


@pytest.mark.parametrize("options", [dict(position="last", top_fraction=0.05), dict(position="mean")])
def test_offloaded_bf16_statistics_equal_the_plain_models_exactly(bf16, offloaded, options):
    plain, dispatched = statistics(bf16.adapter, **options), statistics(offloaded.adapter, **options)
    assert torch.equal(dispatched.neuron_sum, plain.neuron_sum)
    assert torch.equal(dispatched.residual_sum, plain.residual_sum)
    if "top_fraction" in options:
        assert torch.equal(dispatched.top_counts, plain.top_counts)


def interventions(adapter):
    other = collect_statistics(adapter, random_prompts(10, seed=23), pad_token_id=0, progress=False)
    direction = residual_direction(statistics(adapter), other, model="tiny", method="caa", source_layer=1, layers=[1])
    circuit = circuit_on(adapter)
    return {"cna_scale": NeuronScale(adapter, circuit), "cna_mean": NeuronScale(adapter, circuit, mode="mean"),
            "caa": SteeringVector(adapter, direction, scale=2.0), "direction": DirectionAblation(adapter, direction)}


@pytest.mark.parametrize("which", ["bf16", "offloaded"])
def test_alpha_zero_is_bit_identical_in_bf16_for_every_intervention(request, which):
    lm = request.getfixturevalue(which)
    plain = logits(lm.model)
    for name, intervention in interventions(lm.adapter).items():
        with intervention.steer(0.0):
            assert torch.equal(logits(lm.model), plain), name
        with intervention.steer(1.0):
            assert not torch.equal(logits(lm.model), plain), name


@pytest.mark.parametrize("multiplier", [0.3, 1.7])
def test_bf16_hooks_scale_by_the_exact_multiplier_rounded_once(bf16, multiplier):
    """x * m computed in float32 and rounded to bfloat16 once, not x * bf16(m) (0.3 would act as 0.30078125)."""
    adapter = bf16.adapter
    seen = {}
    site = adapter.neuron_sites[0]
    with attached([read_input(site, lambda x: seen.setdefault("plain", x))]):
        logits(bf16.model)
    circuit = circuit_on(adapter)
    with NeuronScale(adapter, circuit).multiply(multiplier), attached([read_input(site,
                                                                                 lambda x: seen.setdefault("m", x))]):
        logits(bf16.model)
    indices = [n.index for n in circuit.by_layer()[0]]
    expected = (seen["plain"][..., indices].float() * multiplier).to(torch.bfloat16)
    assert torch.equal(seen["m"][..., indices], expected)


# The hooks round x_j * m to bfloat16, the baked model rounds W_j * m: the two differ by one bfloat16 rounding
# (relative 2^-9) of the circuit's contributions, which the next layers carry to bfloat16 logits. Allowed: 2 units
# in the last place of the largest logit (measured: at most 1), while steering itself moves the logits by more.
HOOKS_VS_BAKED_ULPS = 2


def bf16_ulp(value: torch.Tensor) -> float:
    return 2.0 ** (torch.floor(torch.log2(value.abs().max().float())).item() - 7)


@pytest.mark.parametrize("multiplier", [0.3, 1.7, 4.0])
def test_bf16_export_of_an_offloaded_model_agrees_with_the_hooks(bf16, offloaded, tmp_path, multiplier):
    circuit = circuit_on(bf16.adapter)
    logits(offloaded.model)  # a forward pass first: exporting after one used to fail on inference tensors
    folder = export_baked_model(offloaded.model, offloaded.tokenizer, offloaded.adapter, circuit, multiplier,
                                tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    plain = logits(bf16.model)
    with NeuronScale(bf16.adapter, circuit).multiply(multiplier):
        hooked = logits(bf16.model)
    tolerance = HOOKS_VS_BAKED_ULPS * bf16_ulp(plain)
    assert (logits(baked).float() - hooked.float()).abs().max() <= tolerance
    assert (hooked.float() - plain.float()).abs().max() > tolerance


def test_in_memory_baking_refuses_offloaded_layers(offloaded):
    with pytest.raises(CnaError, match="^layer 1's neuron weights are offloaded"), \
            baked_weights(offloaded.adapter, circuit_on(offloaded.adapter), 0.0):
        pass


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_export_edits_sharded_checkpoints_on_disk(model_type, tmp_path):
    """Several shards, Linear [out, in] and GPT-2 Conv1D [in, out] weights: the baked model equals the hooks."""
    model = tiny_model(model_type, seed=5)
    model.save_pretrained(tmp_path / "source", max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    assert (tmp_path / "source" / "model.safetensors.index.json").is_file()
    lm = loaded(tmp_path / "source")
    circuit = circuit_on(lm.adapter)
    prompts = random_prompts(4, seed=24)
    with NeuronScale(lm.adapter, circuit).multiply(0.0):
        hooked = generate(lm.model, prompts, **GREEDY)
    assert hooked != generate(lm.model, prompts, **GREEDY)
    folder = export_baked_model(lm.model, lm.tokenizer, lm.adapter, circuit, 0.0, tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert generate(baked, prompts, **GREEDY) == hooked
    with pytest.raises(CnaError, match="into the source checkpoint itself"):
        export_baked_model(lm.model, lm.tokenizer, lm.adapter, circuit, 0.0, tmp_path / "source")


def test_mean_position_is_exact_in_float32_and_ignores_nan_at_padded_positions(bf16):
    """The bf16 activations averaged in float64 by hand, against discovery's mean; then NaN written into padding."""
    adapter, site = bf16.adapter, bf16.adapter.neuron_sites[2]
    prompts = random_prompts(4, seed=25, low=150, high=400)
    ids, mask = pad_batch(prompts, pad_token_id=0, side="left")
    seen = []
    with attached([read_input(site, seen.append)]), torch.inference_mode():
        adapter.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    real = mask.bool().unsqueeze(-1)
    reference = (torch.where(real, seen[0].double(), 0.0).sum(1) / real.sum(1)).sum(0)
    collect = dict(pad_token_id=0, batch_size=4, max_batch_tokens=None, position="mean", progress=False)
    found = collect_statistics(adapter, prompts, **collect)
    torch.testing.assert_close(found.neuron_sum[2], reference, rtol=1e-5, atol=1e-6)

    batch_mask = {}

    def note_mask(_module, _args, kwargs):
        batch_mask["now"] = kwargs["attention_mask"].bool().unsqueeze(-1)  # discovery sorts prompts by length

    def poison_padding(x):
        return torch.where(batch_mask["now"], x, torch.nan)

    with attached([Hook(adapter.body, note_mask, pre=True, with_kwargs=True), map_input(site, poison_padding)]):
        poisoned = collect_statistics(adapter, prompts, **collect)
    assert torch.isfinite(poisoned.neuron_sum).all()
    assert torch.equal(poisoned.neuron_sum, found.neuron_sum)


# --- bitsandbytes ---------------------------------------------------------------------------------------------

def dequantised_twin(quantised: LoadedModel, folder) -> LoadedModel:
    """The bf16 model whose Linear weights are exactly the quantised model's dequantised weights."""
    twin = loaded(folder, dtype="bfloat16")
    modules = dict(quantised.model.named_modules())
    with torch.no_grad():
        for name, module in twin.model.named_modules():
            if isinstance(module, torch.nn.Linear) and isinstance(modules[name], bitsandbytes.nn.Linear4bit):
                weight = modules[name].weight
                module.weight.copy_(bnb_functional.dequantize_4bit(weight.data, weight.quant_state))
            elif isinstance(module, torch.nn.Linear) and isinstance(modules[name], bitsandbytes.nn.Linear8bitLt):
                weight = modules[name].weight
                module.weight.copy_(weight.data.float() * weight.SCB.float()[:, None] / 127)
    return twin


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def quantised(request, tiny_folder) -> LoadedModel:
    return loaded(tiny_folder, dtype="bfloat16", quantization=request.param)


def test_quantised_models_load_on_cpu_with_quantised_neuron_sites(quantised):
    site = quantised.adapter.neuron_sites[0]
    assert isinstance(site, bitsandbytes.nn.Linear4bit | bitsandbytes.nn.Linear8bitLt)
    assert {p.device.type for p in quantised.model.parameters()} == {"cpu"}


def test_quantised_statistics_match_the_dequantised_model(quantised, tiny_folder):
    """Within 4x bf16's own rounding noise (measured: 1.7x for 4-bit, 2.2x for 8-bit).

    The CPU kernels do not run the dequantised weights through torch's matmul: 4-bit uses a fused bfloat16
    kernel and 8-bit quantises the activations to int8 (LLM.int8), so equality is not expected. The noise
    unit is how far the same dequantised model moves between bfloat16 and float32.
    """
    twin = dequantised_twin(quantised, tiny_folder)
    found, reference = statistics(quantised.adapter), statistics(twin.adapter)
    twin.model.float()
    noise = relative_gap(reference.neuron_sum, statistics(ArchitectureAdapter(twin.model)).neuron_sum)
    assert 0 < noise < 0.02
    assert relative_gap(found.neuron_sum, reference.neuron_sum) <= 4 * noise
    assert relative_gap(found.residual_sum, reference.residual_sum) <= 4 * noise


def test_quantised_alpha_zero_is_bit_identical(quantised):
    plain = logits(quantised.model)
    intervention = NeuronScale(quantised.adapter, circuit_on(quantised.adapter))
    with intervention.steer(0.0):
        assert torch.equal(logits(quantised.model), plain)
    with intervention.steer(1.0):
        assert not torch.equal(logits(quantised.model), plain)


def test_quantised_export_and_baking_are_refused_in_one_line(quantised, tmp_path):
    circuit = circuit_on(quantised.adapter)
    with pytest.raises(CnaError) as error:
        export_baked_model(quantised.model, quantised.tokenizer, quantised.adapter, circuit, 0.0, tmp_path / "out")
    assert str(error.value).startswith("cannot export a quantised model") and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CnaError, match="^layer 0's neuron weights are quantised"), \
            baked_weights(quantised.adapter, circuit, 0.0):
        pass


def test_4bit_stored_as_bfloat16_is_still_recognised_as_quantised(tiny_folder, tmp_path):
    """`bnb_4bit_quant_storage=bfloat16` packs 4-bit values into bfloat16 elements: a dtype check passes them."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    adapter = ArchitectureAdapter(model)
    assert adapter.neuron_sites[0].weight.dtype == torch.bfloat16 and adapter.neurons_per_layer == 128
    packed = adapter.neuron_sites[0].weight.view(torch.int16).clone()  # bit patterns: some read as NaN
    with pytest.raises(CnaError, match="quantised"):
        export_baked_model(model, tiny_tokenizer(), adapter, circuit_on(adapter), 0.0, tmp_path / "out")
    assert torch.equal(adapter.neuron_sites[0].weight.view(torch.int16), packed)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_gpt2_conv1d_width_comes_from_declared_features_under_bitsandbytes(quantization, tmp_path):
    # Widths of at least 64, bitsandbytes' 4-bit block on CPU.
    tiny_model("gpt2", n_embd=64, n_inner=128).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    lm = loaded(tmp_path / "gpt2", quantization=quantization)
    assert lm.adapter.neurons_per_layer == 128
    assert torch.isfinite(statistics(lm.adapter).neuron_sum).all()


def test_statistics_cache_key_differs_per_quantisation_and_attention(tiny_folder, bf16, quantised):
    def key(lm):
        return statistics_key(model=activation_identity(lm), site="llama:mlp.down_proj", prompts=PROMPTS,
                              position="last", top_fraction=None)

    eager = loaded(tiny_folder, dtype="bfloat16")
    eager.model.config._attn_implementation = "eager"
    identity = activation_identity(quantised)
    assert identity["dtype"] == activation_identity(bf16)["dtype"] == "torch.bfloat16"  # the old key's only field
    assert identity["quantization"]["quant_method"] == "bitsandbytes"
    assert len({key(bf16), key(quantised), key(eager)}) == 3
    assert key(bf16) == key(loaded(tiny_folder, dtype="bfloat16"))


def test_4bit_and_8bit_key_differently(tiny_folder):
    identities = [activation_identity(loaded(tiny_folder, dtype="bfloat16", quantization=q)) for q in ("4bit", "8bit")]
    assert [i["quantization"]["load_in_4bit"] for i in identities] == [True, False]
    assert identities[0] != identities[1]


def test_offloading_quantised_layers_is_one_line_saying_what_to_set(tiny_folder):
    with pytest.raises(CnaError) as error:
        loaded(tiny_folder, quantization="4bit", device_map={"model.layers.1": "disk", "": "cpu"})
    message = str(error.value)
    assert message.startswith("model.quantization '4bit': the quantised model does not fit") and "\n" not in message
    assert "model.quantization=null" in message


def test_quantisation_on_a_device_bitsandbytes_lacks_is_one_line(tiny_folder, monkeypatch):
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(ConfigError, match=r"^model.quantization '8bit': bitsandbytes \S+ runs on cuda, not on cpu$"):
        loaded(tiny_folder, quantization="8bit")
