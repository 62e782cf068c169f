import pytest
import torch
from transformers import AutoModelForCausalLM

from cna.batching import pad_batch
from cna.circuit import Circuit, Neuron, ResidualDirection
from cna.discovery import (
    collect_statistics,
    contrastive_scores,
    random_circuit,
    residual_direction,
    select_circuit,
)
from cna.errors import CnaError, ConfigError
from cna.export import orthogonalised_weights
from cna.generation import cache_keyword, generate
from cna.hooks import attached, hook_count, read_input, read_output
from cna.interventions import (
    DirectionAblation,
    NeuronScale,
    SteeringVector,
    baked_weights,
    export_baked_model,
    export_orthogonalised_model,
    is_prompt_pass,
)
from cna.models import ArchitectureAdapter
from cna.tiny import tiny_llama, tiny_tokenizer
from conftest import FAMILY_CONFIGS, random_prompts, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=11)
    adapter = ArchitectureAdapter(model)
    positive = collect_statistics(adapter, random_prompts(12, seed=12), pad_token_id=0, progress=False)
    negative = collect_statistics(adapter, random_prompts(12, seed=13), pad_token_id=0, progress=False)
    scores = contrastive_scores(positive, negative)
    circuit = select_circuit(scores, model="tiny", k=12)
    direction = residual_direction(positive, negative, model="tiny", method="caa", source_layer=1, layers=[1])
    return model, adapter, scores, circuit, direction


def every_intervention(setup):
    _, adapter, scores, circuit, direction = setup
    return {
        "cna_scale": NeuronScale(adapter, circuit),
        "cna_mean": NeuronScale(adapter, circuit, mode="mean"),
        "random": NeuronScale(adapter, random_circuit(circuit, scores, 0)),
        "caa": SteeringVector(adapter, direction, scale=4.0),
        "direction": DirectionAblation(adapter, direction),
    }


NAMES = ["cna_scale", "cna_mean", "random", "caa", "direction"]
BATCH = pad_batch(random_prompts(4, seed=14), pad_token_id=0, side="left")


def logits(model):
    ids, mask = BATCH
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", NAMES)
def test_alpha_zero_is_bit_identical_and_alpha_one_is_not(setup, name):
    model = setup[0]
    intervention = every_intervention(setup)[name]
    plain = logits(model)
    with intervention.steer(0.0):
        assert torch.equal(logits(model), plain)
    with intervention.steer(1.0):
        assert not torch.allclose(logits(model), plain)


@pytest.mark.parametrize("name", NAMES)
def test_no_hook_is_left_after_an_exception(setup, name):
    model = setup[0]
    intervention = every_intervention(setup)[name]
    before, plain = hook_count(model), logits(model)
    with pytest.raises(RuntimeError, match="boom"), intervention.steer(1.0):
        assert hook_count(model) > before
        raise RuntimeError("boom")
    assert hook_count(model) == before
    assert torch.equal(logits(model), plain)


@pytest.mark.parametrize("alpha", [-0.1, 1.01])
def test_alpha_outside_unit_interval_is_rejected(setup, alpha):
    with pytest.raises(ConfigError, match="alpha"):
        every_intervention(setup)["cna_scale"].steer(alpha)


def lowest_layer(circuit):
    """The first circuit layer: nothing upstream of it is steered, so its inputs compare to the plain model."""
    layers = circuit.by_layer()
    return min(layers), layers[min(layers)]


def seen_during(model, context, module, reader) -> torch.Tensor:
    """What `module` takes in (reader=read_input) or gives out (read_output) in one forward pass inside `context`."""
    seen = []
    with context, attached([reader(module, seen.append)]):
        logits(model)
    return seen[0]


def neuron_inputs(model, adapter, layer: int, context) -> torch.Tensor:
    return seen_during(model, context, adapter.neuron_sites[layer], read_input)


def test_neuron_scale_multiplies_only_the_circuit(setup):
    model, adapter, _, circuit, _ = setup
    layer, neurons = lowest_layer(circuit)
    inside = torch.tensor([n.index for n in neurons])
    outside = torch.ones(adapter.neurons_per_layer, dtype=torch.bool)
    outside[inside] = False
    intervention = NeuronScale(adapter, circuit)
    plain = neuron_inputs(model, adapter, layer, attached([]))
    for context, factor in [(intervention.steer(1.0), 0.0), (intervention.steer(0.25), 0.75),
                            (intervention.multiply(2.0), 2.0)]:
        steered = neuron_inputs(model, adapter, layer, context)
        torch.testing.assert_close(steered[..., inside], plain[..., inside] * factor)
        torch.testing.assert_close(steered[..., outside], plain[..., outside])
    with pytest.raises(ConfigError, match="multiplier"):
        intervention.multiply(-1.0)


def test_mean_mode_moves_neurons_to_their_negative_mean(setup):
    model, adapter, _, circuit, _ = setup
    layer, neurons = lowest_layer(circuit)
    inside = [n.index for n in neurons]
    means = torch.tensor([n.negative_mean for n in neurons], dtype=torch.float32)
    intervention = NeuronScale(adapter, circuit, mode="mean")
    plain = neuron_inputs(model, adapter, layer, attached([]))
    full = neuron_inputs(model, adapter, layer, intervention.steer(1.0))
    half = neuron_inputs(model, adapter, layer, intervention.steer(0.5))
    torch.testing.assert_close(full[..., inside], means.expand_as(full[..., inside]))
    torch.testing.assert_close(half[..., inside], 0.5 * plain[..., inside] + 0.5 * means)


def residual_after(model, adapter, layer: int, context) -> torch.Tensor:
    return seen_during(model, context, adapter.layers[layer], read_output)


def test_steering_vector_subtracts_alpha_times_scale_times_the_mean_difference(setup):
    model, adapter, _, _, direction = setup
    plain = residual_after(model, adapter, 1, attached([]))
    steered = residual_after(model, adapter, 1, SteeringVector(adapter, direction, scale=2.0).steer(0.5))
    vector = torch.tensor(direction.vector, dtype=torch.float32)
    torch.testing.assert_close(steered, plain - 1.0 * vector)


def test_direction_ablation_leaves_no_component_along_the_direction(setup):
    model, adapter, _, _, direction = setup
    unit = torch.tensor(direction.vector, dtype=torch.float32)
    unit = unit / unit.norm()
    ablation = DirectionAblation(adapter, direction)
    for layer in range(adapter.n_layers):
        plain = residual_after(model, adapter, layer, attached([]))
        ablated = residual_after(model, adapter, layer, ablation.steer(1.0))
        assert (plain @ unit).abs().max() > 1e-2
        assert (ablated @ unit).abs().max() < 1e-5


def test_direction_ablation_keeps_the_direction_from_every_block_input(setup):
    """The published form: the MLP's input (the residual after attention) lacks it too, not only layer outputs."""
    model, adapter, _, _, direction = setup
    unit = torch.tensor(direction.vector, dtype=torch.float32)
    unit = unit / unit.norm()
    inputs: dict[str, list[torch.Tensor]] = {"plain": [], "ablated": []}
    ids, mask = BATCH
    for name, context in (("plain", attached([])), ("ablated", DirectionAblation(adapter, direction).steer(1.0))):
        readers = [read_input(module, inputs[name].append) for layer in model.model.layers
                   for module in (layer.input_layernorm, layer.post_attention_layernorm)]
        with context, attached(readers), torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
    assert len(inputs["ablated"]) == 2 * adapter.n_layers
    assert min(float((x[mask.bool()] @ unit).abs().max()) for x in inputs["plain"]) > 1e-2
    assert max(float((x[mask.bool()] @ unit).abs().max()) for x in inputs["ablated"]) < 1e-5


def ablation_setup(tied: bool):
    model = tiny_llama(seed=11, tie_word_embeddings=tied)
    adapter = ArchitectureAdapter(model)
    positive = collect_statistics(adapter, random_prompts(12, seed=12), pad_token_id=0, progress=False)
    negative = collect_statistics(adapter, random_prompts(12, seed=13), pad_token_id=0, progress=False)
    direction = residual_direction(positive, negative, model="tiny", method="direction", source_layer=1,
                                   layers=list(range(adapter.n_layers)))
    return model, adapter, direction


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_direction_ablation_hooks_equal_the_orthogonalised_weights(tied, alpha, capsys):
    model, adapter, direction = ablation_setup(tied)
    original = {name: p.clone() for name, p in model.state_dict().items()}
    prompts = random_prompts(6, seed=16)
    greedy = dict(pad_token_id=0, eos_token_id=[2], max_new_tokens=12, progress=False)
    with DirectionAblation(adapter, direction).steer(alpha):
        hooked, hooked_tokens = logits(model), generate(model, prompts, **greedy)
    with orthogonalised_weights(model, adapter, direction, alpha):
        assert hook_count(model) == 0
        orthogonalised, orthogonalised_tokens = logits(model), generate(model, prompts, **greedy)
    effect = float((hooked - logits(model)).abs().max())
    difference = float((hooked - orthogonalised).abs().max())
    with capsys.disabled():
        print(f"\ndirectional ablation, alpha {alpha}, {'tied' if tied else 'untied'}: max |logit difference| "
              f"hooks vs orthogonalised weights {difference:.2e} (total effect {effect:.3f})")
    assert effect > 0.05 and difference < 1e-5
    assert orthogonalised_tokens == hooked_tokens
    assert all(torch.equal(p, original[name]) for name, p in model.state_dict().items())  # restored
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_the_orthogonalised_export_generates_what_the_hooks_generate(tied, tmp_path):
    model, adapter, direction = ablation_setup(tied)
    prompts = random_prompts(6, seed=17)
    greedy = dict(pad_token_id=0, eos_token_id=[2], max_new_tokens=12, progress=False)
    with DirectionAblation(adapter, direction).steer(1.0):
        hooked, hooked_tokens = logits(model), generate(model, prompts, **greedy)
    assert (hooked - logits(model)).abs().max() > 0.05
    folder = export_orthogonalised_model(model, tiny_tokenizer(), adapter, direction, tmp_path / "ablated")
    baked = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hook_count(baked) == 0 and not baked.config.tie_word_embeddings
    assert (logits(baked) - hooked).abs().max() < 1e-5
    assert generate(baked, prompts, **greedy) == hooked_tokens


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_direction_ablation_in_every_family(model_type):
    """The hooks leave no component in any layer's output; where blocks write through a linear map the
    orthogonalised weights give the same logits, and where a norm follows (Gemma 2/3, OLMo 2) baking is refused."""
    model = tiny_model(model_type)
    adapter = ArchitectureAdapter(model)
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(3))
    direction = ResidualDirection("tiny", "direction", 0, list(range(adapter.n_layers)), vector.tolist(),
                                  adapter.n_layers)
    unit = vector / vector.norm()
    ablation = DirectionAblation(adapter, direction)
    for layer in range(adapter.n_layers):
        assert (residual_after(model, adapter, layer, ablation.steer(1.0)) @ unit).abs().max() < 1e-4
    with ablation.steer(1.0):
        hooked = logits(model)
    if adapter.family.mlp_out is not None:
        with pytest.raises(CnaError, match=f"^cannot orthogonalise {model_type} weights"), \
                orthogonalised_weights(model, adapter, direction):
            pass
        return
    with orthogonalised_weights(model, adapter, direction):
        torch.testing.assert_close(logits(model), hooked, atol=1e-4, rtol=1e-4)


def test_random_control_steers_its_own_neurons(setup):
    _, adapter, scores, circuit, _ = setup
    control = NeuronScale(adapter, random_circuit(circuit, scores, 5))
    assert control.circuit.layer_counts == circuit.layer_counts
    assert control.circuit.neurons != circuit.neurons


def circuit_values_per_pass(model, adapter, circuit, context, prompts, **generation):
    """For each forward pass of a generation, whether the circuit neurons of one layer were all zero."""
    layer, neurons = lowest_layer(circuit)
    indices = [n.index for n in neurons]
    zeroed = []
    with context, attached([read_input(adapter.neuron_sites[layer],
                                       lambda x: zeroed.append(bool((x[..., indices] == 0).all())))]):
        # An end token outside the vocabulary: every generation runs all its passes.
        generate(model, prompts, pad_token_id=0, eos_token_id=[10_000], progress=False,
                 **{"max_new_tokens": 4, **generation})
    return zeroed


@pytest.mark.parametrize(("positions", "expected"), [("all", [True] * 4), ("prompt", [True, False, False, False]),
                                                     ("generated", [False, True, True, True])])
def test_positions_pick_prompt_or_generated_tokens(setup, positions, expected):
    model, adapter, _, circuit, _ = setup
    prompts = random_prompts(2, seed=15)
    intervention = NeuronScale(adapter, circuit, positions=positions)
    assert circuit_values_per_pass(model, adapter, circuit, intervention.steer(1.0), prompts) == expected


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gpt_neox", "opt"])
@pytest.mark.parametrize("refill", [False, True], ids=["generate", "refill"])
@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_hold_in_every_family_and_generation_loop(model_type, refill, positions):
    """One prompt at a time, three new tokens each: a prefill pass, then two passes of one generated token.
    The one-token prompt's prefill has a single position too: only its empty cache tells it apart."""
    model = tiny_model(model_type, seed=3)
    adapter = ArchitectureAdapter(model)
    circuit = Circuit("tiny", "cna", [Neuron(0, j, 1.0, 1.0, 0.0) for j in range(0, 64, 2)], 2, 64)
    prompts = [[7], random_prompts(1, seed=16)[0]]
    steered = NeuronScale(adapter, circuit, positions=positions).steer(1.0)
    zeroed = circuit_values_per_pass(model, adapter, circuit, steered, prompts, max_new_tokens=3, batch_size=1,
                                     refill=refill)
    prompt_passes = [True, False, False] * 2
    assert zeroed == (prompt_passes if positions == "prompt" else [not p for p in prompt_passes])
    assert hook_count(model) == 0


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_prompt_pass_is_told_by_the_cache_whatever_its_keyword(keyword):
    from transformers import DynamicCache

    model = tiny_model("llama")
    cache = DynamicCache()
    one_token = torch.tensor([[5]])
    assert is_prompt_pass((), {"input_ids": one_token})
    assert is_prompt_pass((), {"input_ids": one_token, keyword: cache})
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{cache_keyword(model): cache})
    assert cache.get_seq_length() == 3
    assert not is_prompt_pass((), {"input_ids": one_token, keyword: cache})
    assert is_prompt_pass((), {"input_ids": torch.tensor([[8, 9]]), keyword: cache})  # a prompt continued


def test_baked_weights_are_restored_after_an_exception(setup):
    model, adapter, _, circuit, _ = setup
    original = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(RuntimeError), baked_weights(adapter, circuit, 0.0):
        assert not torch.equal(model.state_dict()["model.layers.2.mlp.down_proj.weight"],
                               original["model.layers.2.mlp.down_proj.weight"])
        raise RuntimeError
    assert all(torch.equal(p, original[name]) for name, p in model.state_dict().items())


@pytest.mark.parametrize("multiplier", [0.0, 2.0])
def test_baked_export_generates_what_the_hooks_generate(setup, tmp_path, multiplier):
    model, adapter, _, circuit, _ = setup
    prompts = random_prompts(6, seed=16)
    greedy = dict(pad_token_id=0, eos_token_id=[2], max_new_tokens=12, progress=False)
    with NeuronScale(adapter, circuit).multiply(multiplier):
        hooked = generate(model, prompts, **greedy)
    assert hooked != generate(model, prompts, **greedy)
    folder = export_baked_model(model, tiny_tokenizer(), adapter, circuit, multiplier, tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hook_count(baked) == 0
    assert generate(baked, prompts, **greedy) == hooked


def test_circuit_for_another_model_is_rejected(setup):
    _, adapter, _, _, _ = setup
    foreign = Circuit("other", "cna", [Neuron(0, 1, 1.0, 1.0, 0.0)], n_layers=5, neurons_per_layer=10)
    with pytest.raises(ConfigError, match="circuit is for 5 x 10"):
        NeuronScale(adapter, foreign)
