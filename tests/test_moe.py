"""Neuron-level discovery and steering inside mixtures of experts (issue 27), on tiny random models of each family:
Qwen2-MoE (gated shared expert), Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 (dense first layer, shared expert,
group-limited routing) and gpt-oss (biases, clamped activation, transposed weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_pipeline import run, small_job
from transformers import AutoModelForCausalLM

import cna
from cna.attribution import collect_gradients, neuron_writes, refusal_log_odds
from cna.batching import pad_batch
from cna.circuit import (
    Circuit,
    ExpertChoice,
    Neuron,
    ResidualDirection,
    expert_localisation,
    localisation,
    overlap,
)
from cna.config import compose_job
from cna.discovery import (
    ActivationStatistics,
    collect_statistics,
    contrastive_scores,
    random_circuit,
    select_circuit,
    universal_neurons,
)
from cna.errors import CnaError, ConfigError
from cna.evaluation.scoring import next_token_logprobs
from cna.experts import expert_tap
from cna.export import export_baked_model, orthogonalised_weights
from cna.generation import generate
from cna.hooks import Hook, attached, hook_count
from cna.interventions import DirectionAblation, NeuronScale, RouterBias, SteeringVector
from cna.methods.router import select_experts
from cna.model_shape import read_model_shape
from cna.models import ArchitectureAdapter, ModelSpec, load_model
from cna.prefix import LayerPrefixReuse
from cna.run_folder import CIRCUIT, RESULTS
from cna.tiny import MOE_CONFIGS, tiny_moe, write_tiny_model
from cna.validation import validate
from conftest import random_prompts
from moe_reference import planted_moe, reference_statistics

FAMILIES = sorted(MOE_CONFIGS)
KERNELS = ("eager", "batched_mm", "grouped_mm")  # every experts implementation that runs on CPU
IDS, MASK = pad_batch(random_prompts(4, seed=14), pad_token_id=0, side="left")


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS, attention_mask=MASK).logits


def spread_circuit(adapter: ArchitectureAdapter, lowest: int = 0) -> Circuit:
    """Neurons in several routed experts, the shared expert and the dense layer, from layer `lowest` up."""
    neurons = []
    for layer in range(lowest, adapter.n_layers):
        for block in adapter.layout.blocks[layer]:
            if block.expert is None or block.expert % 3 == 1 or block.shared:
                neurons += [Neuron(layer, j, 1.0, 0.5, 0.2 * (j % 3), expert=block.expert)
                            for j in range(block.expert or 0, block.width, 7)]
    return Circuit("tiny", "cna", neurons, adapter.n_layers, adapter.neurons_per_layer)


def interventions(adapter: ArchitectureAdapter, lowest: int = 0) -> dict:
    """Every intervention, acting from layer `lowest` up (the router and CAA from layer 1 at the lowest: DeepSeek-V3's
    layer 0 is dense)."""
    circuit = spread_circuit(adapter, lowest)
    choice = ExpertChoice("tiny", "router", [{"layer": max(lowest, 1), "expert": 3, "shift": -10.0},
                                             {"layer": adapter.n_layers - 1, "expert": 6, "shift": 10.0}],
                          adapter.n_layers, 8)
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(3)).tolist()
    direction = ResidualDirection("tiny", "caa", max(lowest, 1), [max(lowest, 1)], vector, adapter.n_layers)
    return {"cna scale": NeuronScale(adapter, circuit), "cna mean": NeuronScale(adapter, circuit, mode="mean"),
            "cna prompt": NeuronScale(adapter, circuit, positions="prompt"), "router": RouterBias(adapter, choice),
            "caa": SteeringVector(adapter, direction, scale=4.0), "direction": DirectionAblation(adapter, direction)}


def expert_rows(adapter: ArchitectureAdapter, layer: int, seen: list) -> Hook:
    """A tap that records (values, expert, whether a real token) of every row the layer's experts compute."""
    return expert_tap(adapter.experts[layer].fused, lambda v, e, t: seen.append((v.detach().clone(), e.clone(),
                                                                                MASK.flatten()[t].bool())))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_reads_every_experts_neurons_and_config_json_says_the_same(family, tmp_path):
    model = tiny_moe(family)
    adapter = ArchitectureAdapter(model)
    shared = [48] if family == "qwen2_moe" else [32] if family == "deepseek_v3" else []
    moe = {"experts": 8, "width": 32, "shared": shared}
    assert list(adapter.layout.layers) == ([{"dense": 96}] if family == "deepseek_v3" else [moe]) + [moe, moe]
    assert adapter.total_neurons == sum(adapter.layout.layer_width(layer) for layer in range(3))
    assert adapter.neurons_per_layer == 8 * 32 + sum(shared)
    # Row j of an expert's view is what neuron j writes: the fused tensor's column (gpt-oss: its row).
    fused = adapter.experts[1].fused
    expected = fused.down_proj[2] if fused.is_transposed else fused.down_proj[2].t()
    assert torch.equal(adapter.expert_weights(1, 2), expected)
    model.config.to_json_file(tmp_path / "config.json")
    shape = read_model_shape(tmp_path / "config.json")
    assert shape.layer_neurons == tuple(adapter.layout.layer_width(layer) for layer in range(3))
    assert (shape.experts, shape.expert_width, shape.neurons_in(0, 3)) == (8, 32, adapter.total_neurons)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_neuron_in_one_expert_is_found_first(family, capsys):
    planted = planted_moe(family)
    adapter, (layer, expert, index) = planted.adapter, planted.neuron
    positive = collect_statistics(adapter, planted.prompts(16, 20, True), pad_token_id=0, progress=False)
    negative = collect_statistics(adapter, planted.prompts(16, 21, False), pad_token_id=0, progress=False)
    diverse = collect_statistics(adapter, random_prompts(24, 22), pad_token_id=0, progress=False,
                                 top_fraction=0.01)
    circuit = select_circuit(contrastive_scores(positive, negative), model=family, k=10,
                             universal=universal_neurons(diverse, 0.8))
    first, runner_up = circuit.neurons[:2]
    assert (first.layer, first.expert, first.index) == (layer, expert, index)
    assert abs(runner_up.delta) < 0.2 * abs(first.delta)
    assert positive.routing_frequency[layer, expert] == 1.0  # the trigger always goes to the planted expert
    assert circuit.experts["routing_frequency"]["positive"][str(layer)][expert] == 1.0
    with capsys.disabled():
        print(f"\n{family}: planted (layer {layer}, expert {expert}, neuron {index}) rank 1, delta "
              f"{first.delta:.3f}; runner-up {runner_up.key} delta {runner_up.delta:.4f}; negative routing "
              f"frequency of the planted expert {negative.routing_frequency[layer, expert]:.3f}")


@pytest.mark.parametrize("position", ["last", "mean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_a_reference_loop_that_routes_explicitly(family, position):
    model = tiny_moe(family, seed=4)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(6, seed=23)
    found = collect_statistics(adapter, prompts, pad_token_id=0, batch_size=6, max_batch_tokens=None,
                               position=position, progress=False)
    sums, routing = reference_statistics(adapter, prompts, position)
    if position == "last":
        assert torch.equal(found.routing_sum, routing)
    torch.testing.assert_close(found.routing_sum, routing)  # mean: fractions of a prompt's tokens
    torch.testing.assert_close(found.neuron_sum, sums, atol=2e-6, rtol=1e-5)
    assert (found.neuron_sum != 0).sum() > 0.1 * adapter.total_neurons  # not a comparison of zeros


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_bit_identical_with_every_kernel(family, kernel):
    model = tiny_moe(family, seed=5)
    model.set_experts_implementation(kernel)
    adapter = ArchitectureAdapter(model)
    plain = logits(model)
    for name, intervention in interventions(adapter).items():
        with intervention.steer(0.0):
            assert torch.equal(logits(model), plain), name
        with intervention.steer(1.0):
            assert not torch.allclose(logits(model), plain), name
        assert hook_count(model) == 0 and model.config._experts_implementation == kernel


@pytest.mark.parametrize("family", FAMILIES)
def test_the_grouped_gemm_and_batched_kernels_equal_the_loop(family):
    """Statistics, attribution gradients, steered logits and greedy tokens under each kernel, against the loop."""
    model = tiny_moe(family, seed=6)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(8, seed=24)
    steer = NeuronScale(adapter, spread_circuit(adapter))
    results = {}
    for kernel in KERNELS:
        model.set_experts_implementation(kernel)
        statistics = collect_statistics(adapter, prompts, pad_token_id=0, batch_size=4, progress=False,
                                        top_fraction=0.01)
        gradients = collect_gradients(adapter, prompts, refusal_log_odds([5, 6]), pad_token_id=0, batch_size=4,
                                      progress=False)
        with steer.steer(1.0):
            steered = logits(model)
            tokens = generate(model, prompts[:3], pad_token_id=0, eos_token_id=[10_000], max_new_tokens=5,
                              progress=False)
        results[kernel] = statistics, gradients, steered, tokens
    loop = results["eager"]
    for kernel in ("batched_mm", "grouped_mm"):
        statistics, gradients, steered, tokens = results[kernel]
        torch.testing.assert_close(statistics.neuron_sum, loop[0].neuron_sum, atol=1e-6, rtol=1e-5)
        assert torch.equal(statistics.routing_sum, loop[0].routing_sum)
        torch.testing.assert_close(gradients.activation_gradient_sum, loop[1].activation_gradient_sum,
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(steered, loop[2], atol=1e-5, rtol=1e-5)
        assert tokens == loop[3], kernel


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_and_the_baked_export_give_the_same_tokens(family, tmp_path):
    """The export scales down_proj columns in the shards on disk: per-expert tensors as transformers writes them
    (Mixtral's `w2`), the fused tensor where a checkpoint stores one (gpt-oss; Qwen3-MoE written fused by hand)."""
    folder = write_tiny_model(tmp_path / "tiny", seed=7, family=family)
    layouts = {"per-expert": folder}
    if family == "qwen3_moe":
        fused = tmp_path / "fused"
        write_tiny_model(fused, seed=7, family=family)
        state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"),
                  metadata={"format": "pt"})
        layouts["fused"] = fused
    prompts = random_prompts(4, seed=25)
    greedy = dict(pad_token_id=0, eos_token_id=[10_000], max_new_tokens=6, progress=False)
    for name, source in layouts.items():
        lm = load_model(ModelSpec(name="tiny", path=str(source)))
        circuit = spread_circuit(lm.adapter)
        for multiplier in (0.0, 2.5):
            with NeuronScale(lm.adapter, circuit).multiply(multiplier):
                hooked_logits, hooked = logits(lm.model), generate(lm.model, prompts, **greedy)
            out = export_baked_model(lm.model, lm.tokenizer, lm.adapter, circuit, multiplier,
                                     tmp_path / f"{name}_{multiplier}")
            baked = AutoModelForCausalLM.from_pretrained(out).eval()
            assert hook_count(baked) == 0
            torch.testing.assert_close(logits(baked), hooked_logits, atol=1e-5, rtol=1e-5)
            assert generate(baked, prompts, **greedy) == hooked, f"{name} m={multiplier}"
        with safe_open(str(out / "model.safetensors"), "pt") as shard:
            names = list(shard.keys())
        per_expert = any(".experts.3." in key for key in names)
        assert per_expert == (name == "per-expert" and family != "gpt_oss")


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_reuse_is_exact_from_the_first_steered_layer(family):
    model = tiny_moe(family, seed=8)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(6, seed=26)
    for name, intervention in interventions(adapter, lowest=1).items():
        if name == "direction":
            continue
        assert intervention.first_steered_layer() == 1, name
        reuse = LayerPrefixReuse(adapter, 1)
        for alpha in (1.0, 0.0, 0.5):
            with intervention.steer(alpha):
                full = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=3, progress=False)
                reused = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=3, progress=False,
                                             reuse=reuse)
            assert torch.equal(reused, full), f"{name} alpha {alpha}"
        assert hook_count(model) == 0


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_steering_changes_a_neuron_only_where_its_expert_runs_and_only_at_the_chosen_positions(family):
    model = tiny_moe(family, seed=9)
    adapter = ArchitectureAdapter(model)
    neurons = [Neuron(2, j, 1.0, 0.0, 0.0, expert=4) for j in range(0, 32, 2)]
    circuit = Circuit("tiny", "cna", neurons, 3, adapter.neurons_per_layer)
    seen: list = []
    with NeuronScale(adapter, circuit).steer(1.0), attached([expert_rows(adapter, 2, seen)]):
        logits(model)
    values, experts, real = (torch.cat(parts) for parts in zip(*seen, strict=True))
    assert (experts == 4).any() and (values[experts == 4][:, ::2] == 0).all()
    # Elsewhere nothing changes (padding positions hold zero states from layer 1 on: only real tokens count).
    assert (values[real & (experts != 4)] != 0).all() and (values[real & (experts == 4)][:, 1::2] != 0).all()
    for positions, expected in (("prompt", [True, False, False]), ("generated", [False, True, True])):
        every_row = Circuit("tiny", "cna", [Neuron(2, j, 1.0, 0.0, 0.0, expert=e) for e in range(8)
                                            for j in range(32)], 3, adapter.neurons_per_layer)
        passes: list = []
        zeroed = expert_tap(adapter.experts[2].fused, lambda v, _e, _t, seen=passes: seen.append(bool((v == 0).all())))
        with NeuronScale(adapter, every_row, positions=positions).steer(1.0), attached([zeroed]):
            generate(model, [[5, 9, 12]], pad_token_id=0, eos_token_id=[10_000], max_new_tokens=3, batch_size=1,
                     progress=False)
        assert passes == expected, positions


@pytest.mark.parametrize("family", FAMILIES)
def test_the_router_baseline_suppresses_and_boosts_experts(family):
    planted = planted_moe(family)
    adapter, (layer, expert, _) = planted.adapter, planted.neuron
    positive = collect_statistics(adapter, planted.prompts(12, 30, True), pad_token_id=0, progress=False)
    negative = collect_statistics(adapter, planted.prompts(12, 31, False), pad_token_id=0, progress=False)
    # The pairs whose routing frequency differs most between the sets (the trigger fixes the positive prompts'
    # routing at every layer), suppressed where the positive set chooses them more.
    difference = positive.routing_frequency - negative.routing_frequency
    choice = select_experts(positive, negative, model=family, n_experts=8)
    gaps = [float(difference[e["layer"], e["expert"]].abs()) for e in choice.experts]
    routed = difference[[i for i, spec in enumerate(adapter.layout.layers) if "experts" in spec]]
    assert gaps == routed.abs().flatten().sort(descending=True).values[:8].tolist()
    assert positive.routing_frequency[layer, expert] == 1.0
    assert all(e["shift"] == (-10.0 if difference[e["layer"], e["expert"]] >= 0 else 10.0) for e in choice.experts)
    for shift, always in ((-100.0, False), (100.0, True)):
        router = RouterBias(adapter, ExpertChoice(family, "router", [{"layer": layer, "expert": expert,
                                                                      "shift": shift}], 3, 8))
        seen: list = []
        with router.steer(1.0), attached([expert_rows(adapter, layer, seen)]):
            logits(planted.model)
        chosen = torch.cat([e for _, e, _ in seen]).view(-1)
        routed = (chosen == expert).sum()
        assert routed == (IDS.numel() if always else 0), shift
    assert RouterBias(adapter, choice).first_steered_layer() == min(e["layer"] for e in choice.experts)


def test_the_public_steer_takes_a_router_choice_through_the_registry():
    planted = planted_moe("qwen3_moe")
    model, (layer, expert, _) = planted.model, planted.neuron
    choice = ExpertChoice("tiny", "router", [{"layer": layer, "expert": expert, "shift": -100.0}], 3, 8)
    plain = logits(model)
    with cna.steer(model, choice, 0.0):
        assert torch.equal(logits(model), plain)
    with RouterBias(ArchitectureAdapter(model), choice).steer(1.0):
        direct = logits(model)
    with cna.steer(model, choice, 1.0, positions="all"):
        assert torch.equal(logits(model), direct) and not torch.equal(direct, plain)
    assert hook_count(model) == 0
    with pytest.raises(ConfigError, match="^steer: mode do not apply to router"):
        cna.steer(model, choice, mode="mean")


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_causal_scores_and_the_random_control_work_on_expert_neurons(family):
    model = tiny_moe(family, seed=10)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(6, seed=27)
    statistics = collect_statistics(adapter, prompts, pad_token_id=0, progress=False)
    gradients = collect_gradients(adapter, prompts, refusal_log_odds([5, 6]), pad_token_id=0, progress=False)
    layout = adapter.layout
    for layer, spec in enumerate(layout.layers):  # a routed expert's gradient is 0 where no last token chose it
        for expert in range(spec.get("experts", 0)):
            block = layout.block(layer, expert)
            nonzero = bool(gradients.gradient_sum[layer, block.offset : block.offset + block.width].any())
            assert nonzero == bool(statistics.routing_sum[layer, expert] > 0), (layer, expert)
    assert not (gradients.gradient_sum * ~layout.valid()).any()  # padding has no neurons
    unit = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    writes = neuron_writes(adapter, unit)
    block = layout.block(2, 3)
    torch.testing.assert_close(writes[2, block.offset + 5], adapter.expert_weights(2, 3)[5].double() @ (
        unit / unit.norm()))
    scores = contrastive_scores(statistics, collect_statistics(adapter, random_prompts(6, 28), pad_token_id=0,
                                                               progress=False))
    circuit = select_circuit(scores, model=family, k_fraction=0.02)
    assert circuit.k == round(0.02 * adapter.total_neurons)  # k counts routed, shared and dense neurons alike
    control = random_circuit(circuit, scores, seed=1)
    assert control.layer_counts == circuit.layer_counts and not overlap(control, circuit)
    NeuronScale(adapter, control)  # every drawn (layer, expert, index) exists


def test_circuit_json_records_experts_and_a_dense_circuit_is_unchanged(tmp_path):
    adapter = planted_moe("deepseek_v3").adapter
    statistics = collect_statistics(adapter, random_prompts(5, 29), pad_token_id=0, progress=False)
    negative = collect_statistics(adapter, random_prompts(5, 30), pad_token_id=0, progress=False)
    circuit = select_circuit(contrastive_scores(statistics, negative), model="tiny", k=200)
    saved = json.loads(Circuit.load(circuit.save(tmp_path / "circuit.json")).save(tmp_path / "again.json")
                       .read_text())
    assert saved == json.loads((tmp_path / "circuit.json").read_text())
    assert all(("expert" in n) == (n["layer"] > 0) for n in saved["neurons"])  # layer 0 is dense
    assert {n["layer"] for n in saved["neurons"]} == {0, 1, 2} and saved["k"] == 200
    assert set(saved["experts"]) == {"layout", "routing_frequency"}
    assert set(saved["experts"]["routing_frequency"]["positive"]) == {"1", "2"}  # layer 0 is dense
    where = localisation(Circuit.from_dict(saved))
    assert where["routed_fraction"] + where["shared_fraction"] + where["dense_fraction"] == pytest.approx(1.0)
    assert expert_localisation(circuit)["expert_pairs"] == len(circuit.expert_counts)
    dense = Circuit("tiny", "cna", [Neuron(0, 3, 1.0, 1.0, 0.0)], 2, 64).to_dict()
    assert "expert" not in dense["neurons"][0] and "experts" not in dense
    statistics.save(tmp_path / "statistics.safetensors")
    loaded = ActivationStatistics.load(tmp_path / "statistics.safetensors")
    assert loaded.layout == statistics.layout and torch.equal(loaded.routing_sum, statistics.routing_sum)


def test_a_kernel_cna_cannot_read_and_a_circuit_for_a_dense_model_are_one_line_errors():
    model = tiny_moe("qwen3_moe")
    adapter = ArchitectureAdapter(model)
    model.config._experts_implementation = "sonicmoe"
    with pytest.raises(CnaError, match="^experts implementation 'sonicmoe' cannot be read") as error, \
            NeuronScale(adapter, spread_circuit(adapter)).steer(1.0):
        pass
    assert "\n" not in str(error.value) and hook_count(model) == 0
    model.config._experts_implementation = "grouped_mm"
    dense = Circuit("tiny", "cna", [Neuron(1, 3, 1.0, 1.0, 0.0)], 3, adapter.neurons_per_layer)
    with pytest.raises(CnaError, match="circuit does not fit the model: layer 1 has no expert None"):
        NeuronScale(adapter, dense)


def test_hooks_are_gone_and_the_kernel_is_back_after_an_exception():
    model = tiny_moe("deepseek_v3")
    adapter = ArchitectureAdapter(model)
    plain = logits(model)
    for name, intervention in interventions(adapter).items():
        with pytest.raises(RuntimeError, match="inside"), intervention.steer(1.0):
            logits(model)
            raise RuntimeError("inside")
        assert hook_count(model) == 0 and model.config._experts_implementation == "grouped_mm", name
    assert torch.equal(logits(model), plain)
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(5)).tolist()
    direction = ResidualDirection("tiny", "direction", 0, [0, 1, 2], vector, 3)
    with pytest.raises(CnaError, match="^cannot orthogonalise deepseek_v3 weights"), \
            orthogonalised_weights(model, adapter, direction):
        pass


# The keys of each model's hub config.json that the shape check reads (typed from the hub files: this machine has no
# hub access), and what they give: layers, routed experts, their width.
REAL_CONFIGS = {
    "qwen3_30b_a3b": ({"model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128,
                       "moe_intermediate_size": 768, "intermediate_size": 6144, "decoder_sparse_step": 1,
                       "mlp_only_layers": [], "num_experts_per_tok": 8, "hidden_size": 2048}, 48, 128, 768),
    "mixtral_8x7b": ({"model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8,
                      "intermediate_size": 14336, "num_experts_per_tok": 2, "hidden_size": 4096}, 32, 8, 14336),
    "olmoe_1b_7b": ({"model_type": "olmoe", "num_hidden_layers": 16, "num_experts": 64, "intermediate_size": 1024,
                     "num_experts_per_tok": 8, "hidden_size": 2048}, 16, 64, 1024),
    "gpt_oss_20b": ({"model_type": "gpt_oss", "num_hidden_layers": 24, "num_local_experts": 32,
                     "intermediate_size": 2880, "experts_per_token": 4, "hidden_size": 2880,
                     "quantization_config": {"quant_method": "mxfp4"}}, 24, 32, 2880),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_moe_configs_are_checked_from_config_json_before_weights_load(name, tmp_path):
    config, layers, experts, width = REAL_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = read_model_shape(tmp_path / "config.json")
    assert (shape.n_layers, shape.experts, shape.expert_width, len(shape.moe_layers)) == (layers, experts, width,
                                                                                           layers)
    total = layers * experts * width
    assert shape.neurons_in(0, layers) == total

    def job(*overrides: str):
        return compose_job([f"model={name}", f"model.path={tmp_path}", "logger=none", *overrides])

    assert job().model.device_map == "auto" and "/" in job().model.name
    validate(job(f"method.k={total}"))
    validate(job("method=router", f"method.n_experts={layers * experts}"))
    with pytest.raises(ConfigError, match=f"^method.k: expected at most {total} .*with their routed and shared "):
        validate(job(f"method.k={total + 1}"))
    with pytest.raises(ConfigError, match=f"^method.n_experts: expected at most {layers * experts} "):
        validate(job("method=router", f"method.n_experts={layers * experts + 1}"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                      "intermediate_size": 64}))
    with pytest.raises(ConfigError, match="^method.name: expected a method for dense models"):
        validate(job("method=router"))


@pytest.mark.parametrize("method", ["cna", "router"])
def test_a_job_on_a_tiny_moe_writes_the_contract_files(tmp_path, method):
    folder = write_tiny_model(tmp_path / "moe", family="deepseek_v3")
    chosen = ["method.k=6"] if method == "cna" else ["method.n_experts=3"]
    results = run(small_job(folder, tmp_path / "cache", f"method={method}", *chosen), tmp_path / "run")
    assert results["status"] == "complete" and [p["alpha"] for p in results["points"]] == [0.0, 1.0]
    assert json.loads((tmp_path / "run" / RESULTS).read_text()) == results
    circuit = json.loads((tmp_path / "run" / CIRCUIT).read_text())
    assert circuit["method"] == method
    if method == "cna":
        assert circuit["k"] == 6 and all(("expert" in n) == (n["layer"] > 0) for n in circuit["neurons"])
        assert set(circuit["experts"]["routing_frequency"]) == {"positive", "negative"}
        assert (tmp_path / "run" / "expert_histogram.png").read_bytes().startswith(b"\x89PNG")
        assert not (tmp_path / "run" / "neurons.md").exists()  # neuron cards read dense (layer, index) neurons
    else:
        assert "neurons" not in circuit and circuit["n_experts"] == 3
        assert all(e["layer"] > 0 and e["shift"] in (-10.0, 10.0) for e in circuit["experts"])
