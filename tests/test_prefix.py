"""Layer-prefix reuse: logits from layers L.. on recorded states equal a full forward's, bit for bit in float32."""

from __future__ import annotations

import pytest
import torch

from cna.circuit import Circuit, Neuron, ResidualDirection
from cna.evaluation.scoring import next_token_logprobs
from cna.hooks import Hook, attached, hook_count
from cna.interventions import DirectionAblation, NeuronScale, SteeringVector
from cna.models import ArchitectureAdapter
from cna.prefix import LayerPrefixReuse, PrefixStore, prefix_reuse
from tests.conftest import random_prompts, tiny_model

FAMILIES = ["llama", "qwen2", "gemma", "gemma3_text", "phi3", "olmo2", "phi", "gpt2", "gptj", "gpt_neox", "opt"]
ALPHAS = (0.5, 1.0, 0.0, 0.25)  # the first call records the prefix, the others run layers L.. only


def interventions(adapter: ArchitectureAdapter, lowest: int) -> dict:
    """Every intervention with a lowest layer, acting from layer `lowest` up."""
    width, top = adapter.neurons_per_layer, adapter.n_layers
    neurons = [Neuron(layer, j, 1.0, 0.5, 0.3 * (j % 3)) for layer in range(lowest, top) for j in range(1, width, 5)]
    circuit = Circuit("tiny", "cna", neurons, top, width)
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(3)).tolist()
    direction = ResidualDirection("tiny", "caa", source_layer=lowest, layers=[lowest], vector=vector, n_layers=top)
    return {
        "cna scale": NeuronScale(adapter, circuit),
        "cna mean": NeuronScale(adapter, circuit, mode="mean"),
        "cna prompt positions": NeuronScale(adapter, circuit, positions="prompt"),
        "caa": SteeringVector(adapter, direction, scale=4.0),
    }


def layer_calls(adapter: ArchitectureAdapter, layer: int) -> tuple[list, Hook]:
    calls: list = []
    return calls, Hook(adapter.layers[layer], lambda *_: calls.append(1), pre=True)


def assert_reuse_is_exact(model, adapter: ArchitectureAdapter, prompts, lowest: int, batch_size: int = 4,
                          alphas: tuple[float, ...] = ALPHAS) -> None:
    for name, intervention in interventions(adapter, lowest).items():
        assert intervention.first_steered_layer() == lowest
        reuse = LayerPrefixReuse(adapter, lowest)
        for alpha in alphas:
            with intervention.steer(alpha):
                full = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=batch_size, progress=False)
                skipped, counter = layer_calls(adapter, 0)
                with attached([counter]):
                    reused = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=batch_size,
                                                 progress=False, reuse=reuse)
            assert torch.equal(reused, full), f"{name} alpha {alpha}: reused logits differ from the full forward"
            first_call = alpha == alphas[0]
            assert bool(skipped) == first_call, f"{name} alpha {alpha}: layer 0 ran {len(skipped)} times"
        assert hook_count(model) == 0
        assert list(adapter.model.get_submodule(adapter.family.layers)) == adapter.layers  # real layers are back


@pytest.mark.parametrize("model_type", FAMILIES)
def test_reused_prefix_gives_the_full_forwards_logits(model_type):
    model = tiny_model(model_type, **({"n_layer": 4} if model_type in ("gpt2", "gptj") else {"num_hidden_layers": 4}))
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(10, seed=4)  # lengths 5-23: left padding in every batch
    assert_reuse_is_exact(model, adapter, prompts, lowest=2)


def test_lowest_layers_1_and_last_and_one_row_batches():
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(5, seed=5)
    for lowest in (1, 3):
        assert_reuse_is_exact(model, adapter, prompts, lowest, batch_size=1)


def test_directional_ablation_and_layer_0_get_no_reuse():
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = ArchitectureAdapter(model)
    vector = [1.0] * adapter.hidden_size
    ablation = DirectionAblation(adapter, ResidualDirection("tiny", "direction", 0, list(range(4)), vector, 4))
    assert ablation.first_steered_layer() is None
    assert prefix_reuse(adapter, ablation, memory_mib=64, disk_mib=64) is None
    at_zero = interventions(adapter, 0)["cna scale"]
    assert prefix_reuse(adapter, at_zero, memory_mib=64, disk_mib=64) is None
    assert prefix_reuse(adapter, interventions(adapter, 2)["caa"], memory_mib=64, disk_mib=64).layer == 2
    assert prefix_reuse(adapter, interventions(adapter, 2)["caa"], memory_mib=0, disk_mib=0) is None


def test_states_beyond_memory_go_to_disk_then_to_the_full_forward():
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(12, seed=6)
    intervention = interventions(adapter, 2)["cna scale"]
    longest = max(len(p) for p in prompts)
    one_batch_mib = 4 * longest * adapter.hidden_size * 4 / 2**20  # the first batch: 4 rows x longest x float32
    for memory, disk, kept in ((one_batch_mib, 0, 1), (0, one_batch_mib, 1), (0, 0, 0)):
        reuse = LayerPrefixReuse(adapter, 2, memory_mib=memory, disk_mib=disk)
        results = []
        for alpha in (1.0, 1.0, 0.5):
            with intervention.steer(alpha):
                results.append(next_token_logprobs(model, prompts, pad_token_id=0, batch_size=4, progress=False,
                                                   reuse=reuse))
                if alpha == 0.5:
                    full = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=4, progress=False)
        assert reuse.recorded_batches == kept, (memory, disk)
        assert torch.equal(results[0], results[1]) and torch.equal(results[2], full)
        reuse.close()


def scored(model, adapter, prompts, intervention, alpha, reuse=None) -> tuple[torch.Tensor, list[int]]:
    """Logits under the intervention, and how many times each decoder layer ran."""
    counters = [layer_calls(adapter, layer) for layer in range(adapter.n_layers)]
    with intervention.steer(alpha), attached([hook for _, hook in counters]):
        logits = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=4, progress=False, reuse=reuse)
    return logits, [len(calls) for calls, _ in counters]


def test_a_later_job_starts_from_the_prefix_an_earlier_one_stored(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(10, seed=7)  # 3 batches of up to 4
    identity = {"model": "tiny llama"}

    def job(lowest: int) -> LayerPrefixReuse:  # a fresh store object per job, as in a new process
        return LayerPrefixReuse(adapter, lowest, store=PrefixStore(tmp_path / "prefixes", identity, budget_mib=64),
                                checkpoint_every=2)

    def stored(layer: int) -> int:
        return len(list((tmp_path / "prefixes").rglob(f"layer_{layer}/*.safetensors")))

    first = job(3)
    steer_3 = interventions(adapter, 3)["cna scale"]
    full, runs = scored(model, adapter, prompts, steer_3, 1.0)
    reused, recording_runs = scored(model, adapter, prompts, steer_3, 1.0, first)
    assert torch.equal(reused, full) and recording_runs == runs == [3] * 6  # recording is a full forward
    assert (stored(3), stored(2), stored(4)) == (3, 3, 0)  # its own layer and the checkpoint it passed

    same_layer = job(3)  # another recipe with the same lowest layer: layers 0-2 never run
    full, _ = scored(model, adapter, prompts, steer_3, 0.5)
    reused, runs = scored(model, adapter, prompts, steer_3, 0.5, same_layer)
    assert torch.equal(reused, full) and runs == [0, 0, 0, 3, 3, 3] and same_layer.store.read_batches == 3

    higher = job(5)  # starts from layer 3's states, records 5 and checkpoint 4 on the way, then skips layers 0-4
    steer_5 = interventions(adapter, 5)["caa"]
    for alpha, layer_runs in ((1.0, [0, 0, 0, 3, 3, 3]), (0.5, [0, 0, 0, 0, 0, 3])):
        full, _ = scored(model, adapter, prompts, steer_5, alpha)
        reused, runs = scored(model, adapter, prompts, steer_5, alpha, higher)
        assert torch.equal(reused, full) and runs == layer_runs, alpha
    assert (stored(4), stored(5)) == (3, 3)

    lower = job(2)  # finds the checkpoint layer 2 the first job stored
    steer_2 = interventions(adapter, 2)["cna mean"]
    full, _ = scored(model, adapter, prompts, steer_2, 1.0)
    reused, runs = scored(model, adapter, prompts, steer_2, 1.0, lower)
    assert torch.equal(reused, full) and runs == [0, 0, 3, 3, 3, 3]

    lowest = job(1)  # nothing stored at or below layer 1: a full forward that records
    steer_1 = interventions(adapter, 1)["cna prompt positions"]
    full, _ = scored(model, adapter, prompts, steer_1, 1.0)
    reused, runs = scored(model, adapter, prompts, steer_1, 1.0, lowest)
    assert torch.equal(reused, full) and runs == [3] * 6 and lowest.store.read_batches == 0

    other_model = LayerPrefixReuse(adapter, 3, store=PrefixStore(tmp_path / "prefixes", {"model": "other"}, 64))
    assert scored(model, adapter, prompts, steer_3, 1.0, other_model)[1] == [3] * 6  # keyed by model: no hit
    assert hook_count(model) == 0


def test_the_prefix_store_stops_writing_at_its_budget_and_skips_unreadable_files(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = ArchitectureAdapter(model)
    prompts = random_prompts(8, seed=8)
    steer = interventions(adapter, 2)["cna scale"]
    one_batch_mib = 4 * max(len(p) for p in prompts) * adapter.hidden_size * 4 / 2**20
    store = PrefixStore(tmp_path / "prefixes", {}, budget_mib=one_batch_mib)
    scored(model, adapter, prompts, steer, 1.0, LayerPrefixReuse(adapter, 2, store=store, checkpoint_every=4))
    files = sorted((tmp_path / "prefixes").rglob("*.safetensors"))
    assert len(files) == 1  # the other batch was over the budget
    files[0].write_bytes(files[0].read_bytes()[:100])  # a truncated file, as from a full disk
    full, _ = scored(model, adapter, prompts, steer, 0.5)
    later = LayerPrefixReuse(adapter, 2, store=PrefixStore(tmp_path / "prefixes", {}, budget_mib=one_batch_mib))
    reused, runs = scored(model, adapter, prompts, steer, 0.5, later)
    assert torch.equal(reused, full) and runs == [2] * 4 and later.store.read_batches == 0


def test_a_job_with_prefix_reuse_measures_what_one_without_does(tiny_folder, tmp_path):
    from test_pipeline import run, small_job

    settings = ["method.k=4", "method.layers=[0.5,1.0]", "reuse_baseline=false", "alphas=[0.0,0.5,1.0]",
                "eval.mmlu.n=9", "eval.refusal.n=0", "eval.over_refusal.jbb_benign.n=0",
                "eval.over_refusal.xstest_safe.n=0"]
    reused = run(small_job(tiny_folder, tmp_path / "cache", *settings), tmp_path / "reused")
    full = run(small_job(tiny_folder, tmp_path / "cache", *settings, "prefix_reuse_mib=0",
                         "prefix_reuse_disk_mib=0", "prefix_cache_mib=0"), tmp_path / "full")
    assert reused["points"] == full["points"]
    assert reused["points"][2]["kl_divergence"] > 0
    assert "prefix_reuse" not in full
    assert reused["prefix_reuse"]["layer"] >= 1 and reused["prefix_reuse"]["recorded_batches"] == 3 + 1  # 9 + 3
    assert reused["prefix_reuse"]["batches_from_earlier_jobs"] == 0
    again = run(small_job(tiny_folder, tmp_path / "cache", *settings), tmp_path / "again")  # the sweep's next job
    assert again["points"] == full["points"]
    assert again["prefix_reuse"]["batches_from_earlier_jobs"] == 3 + 1


@pytest.mark.integration
def test_reuse_is_exact_on_smollm2(smollm2_folder):
    from cna.data import encode_prompts
    from cna.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(name="HuggingFaceTB/SmolLM2-135M-Instruct", path=str(smollm2_folder)))
    assert loaded.model.dtype == torch.float32
    questions = ["What is the capital of France?", "How do I pick a lock?", "Write a poem about the sea.",
                 "The following are multiple choice questions (with answers) about astronomy.\n\nWhich planet is "
                 "largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:", "Explain photosynthesis briefly.",
                 "Name three prime numbers."]
    prompts = encode_prompts(loaded.tokenizer, questions)
    assert_reuse_is_exact(loaded.model, loaded.adapter, prompts, 21, batch_size=4, alphas=(1.0, 0.5))
