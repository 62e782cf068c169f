"""Circuit stability: resampled scores are exactly discovery's on the subset; a planted neuron is chosen every time;
the stable core and the rest are what they say; a job records frequencies and steers the subset it names."""

import json

import pytest
import torch
from test_pipeline import run, small_job

from cna.attribution import collect_gradients, collect_prompt_gradients, refusal_log_odds, score_neurons
from cna.circuit import Circuit, Neuron
from cna.config import compose_job
from cna.discovery import collect_statistics, select_circuit
from cna.errors import CnaError, ConfigError
from cna.models import ArchitectureAdapter
from cna.run_folder import CIRCUIT, RESULTS
from cna.stability import (
    PromptValues,
    Stability,
    candidate_neurons,
    measure_stability,
    output_weights,
    record_prompt_values,
    resampled_scores,
    subset_circuit,
    with_frequencies,
)
from cna.tiny import tiny_llama, tiny_moe, write_tiny_model
from cna.validation import validate
from conftest import planted_model, random_prompts

DIRECTION_LAYER = 1
REFUSAL_TOKEN = 60


def _statistics(adapter, prompts, batch_size=4):
    return collect_statistics(adapter, prompts, pad_token_id=0, batch_size=batch_size, progress=False)


@pytest.fixture(scope="module")
def recorded():
    """A tiny random model, two prompt sets, and every neuron's per-prompt values with the positive gradients.

    One prompt a batch: a prompt's values then do not depend on which prompts share its batch (padding moves float32
    values in their last bits), so a subset's fresh discovery sees the very same values."""
    adapter = ArchitectureAdapter(tiny_llama(seed=4))
    positive, negative = random_prompts(10, seed=11), random_prompts(9, seed=12)
    neurons = torch.arange(adapter.total_neurons)
    metric = refusal_log_odds([REFUSAL_TOKEN])
    common = dict(pad_token_id=0, batch_size=1, progress=False)
    positive_values, positive_residual = record_prompt_values(adapter, positive, neurons,
                                                              residual_layer=DIRECTION_LAYER, **common)
    negative_values, negative_residual = record_prompt_values(adapter, negative, neurons,
                                                              residual_layer=DIRECTION_LAYER, **common)
    activation_gradient, gradient = collect_prompt_gradients(adapter, positive, metric, neurons, **common)
    values = PromptValues(neurons, positive_values, negative_values, activation_gradient, gradient,
                          positive_residual, negative_residual)
    return adapter, positive, negative, metric, values


@pytest.mark.parametrize("score", ["delta", "projection", "attribution", "target"])
def test_a_resampled_score_is_discovery_run_on_the_subset(recorded, score):
    """Exact, not approximate: the subset's score from per-prompt values equals a fresh discovery on those prompts."""
    adapter, positive, negative, metric, values = recorded
    positive_rows, negative_rows = torch.tensor([0, 2, 3, 7, 9]), torch.tensor([1, 4, 5, 8])
    subset_positive = [positive[i] for i in positive_rows]
    subset_negative = [negative[i] for i in negative_rows]
    gradients = collect_gradients(adapter, subset_positive, metric, pad_token_id=0, batch_size=1, progress=False)
    fresh = score_neurons(score, _statistics(adapter, subset_positive, 1), _statistics(adapter, subset_negative, 1),
                          adapter, direction_layer=DIRECTION_LAYER, gradients=gradients).ranking.flatten()
    writes = output_weights(adapter, values.neurons)
    assert torch.equal(writes[adapter.neurons_per_layer + 5], adapter.neuron_weights(1)[5].double())
    resampled = resampled_scores(values, score, positive_rows, negative_rows, writes)
    assert fresh.abs().max() > 0
    torch.testing.assert_close(resampled, fresh, rtol=1e-9, atol=1e-12)


def test_prompt_values_round_trip_through_a_file(recorded, tmp_path):
    values = recorded[4]
    loaded = PromptValues.load(values.save(tmp_path / "values.safetensors"))
    assert loaded.negative_residual is not None and loaded.positive_gradient.dtype == torch.float64
    for name, tensor in vars(values).items():
        assert torch.equal(getattr(loaded, name), tensor), name


@pytest.fixture(scope="module")
def planted_stability():
    planted = planted_model()
    positive = planted.prompts(24, 1, planted.positive_trigger)
    negative = planted.prompts(24, 2, planted.negative_trigger)
    scores = score_neurons("delta", _statistics(planted.adapter, positive), _statistics(planted.adapter, negative),
                           planted.adapter, direction_layer=0)
    universal = torch.zeros_like(scores.delta, dtype=torch.bool)
    universal[planted.universal_neuron] = True  # what the filter finds on a diverse set (test_discovery)
    circuit = select_circuit(scores, model="planted", k=3, sign="positive", universal=universal)
    pool = candidate_neurons(scores, k=3, sign="positive", universal=universal, count=60)
    common = dict(pad_token_id=0, batch_size=8, progress=False)
    values = PromptValues(pool, record_prompt_values(planted.adapter, positive, pool, **common)[0],
                          record_prompt_values(planted.adapter, negative, pool, **common)[0])
    return planted, circuit, values


def test_the_planted_neurons_are_chosen_in_every_resample(planted_stability):
    planted, circuit, values = planted_stability
    assert {n.key for n in circuit.neurons} == set(planted.positive_neurons)
    stability = measure_stability(values, circuit, score="delta", sign="positive", resamples=40, fraction=0.5)
    assert stability.reproduced and stability.sizes == (12, 12)
    assert {key: stability.frequency[key] for key in planted.positive_neurons} == dict.fromkeys(
        planted.positive_neurons, 1.0)
    assert set(stability.core) == set(planted.positive_neurons) and stability.rest == []
    summary = stability.summary()
    assert summary["jaccard_mean"] == summary["jaccard_min"] == summary["halves_jaccard"] == 1.0
    assert summary["deepest_rank"] == 3 and summary["candidates"] == 60
    recorded = with_frequencies(circuit, stability)
    assert [n.selection_frequency for n in recorded.neurons] == [1.0, 1.0, 1.0]
    assert Circuit.from_dict(json.loads(json.dumps(recorded.to_dict()))).stability == summary


def test_resamples_of_a_noise_circuit_disagree_and_the_same_seed_repeats_them(recorded):
    """Random prompts on a random model: no neuron tells the sets apart, so the resampled circuits vary."""
    adapter, positive, negative, _, values = recorded
    scores = score_neurons("delta", _statistics(adapter, positive, 1), _statistics(adapter, negative, 1), adapter,
                           direction_layer=0)
    circuit = select_circuit(scores, model="tiny", k=6, sign="abs")
    pool = candidate_neurons(scores, k=6, sign="abs", count=adapter.total_neurons)
    pool_values = PromptValues(pool, values.positive[:, pool], values.negative[:, pool])
    first = measure_stability(pool_values, circuit, score="delta", sign="abs", resamples=30, fraction=0.5, seed=3)
    again = measure_stability(pool_values, circuit, score="delta", sign="abs", resamples=30, fraction=0.5, seed=3)
    other = measure_stability(pool_values, circuit, score="delta", sign="abs", resamples=30, fraction=0.5, seed=4)
    assert torch.equal(first.membership, again.membership) and not torch.equal(first.membership, other.membership)
    summary = first.summary()
    assert first.reproduced and summary["jaccard_mean"] < 0.9 and summary["jaccard_min"] < summary["jaccard_max"]
    assert summary["deepest_rank"] > 6 and summary["core_size"] < 6
    assert min(first.frequency.values()) < 0.5 < max(first.frequency.values())


def _stability(frequencies: list[float]) -> tuple[Circuit, Stability]:
    """A circuit of len(frequencies) neurons in layer 0 whose resamples chose neuron i with frequencies[i]."""
    neurons = [Neuron(0, i, 1.0 - i / 10, 0.0, 0.0) for i in range(len(frequencies))]
    circuit = Circuit("m", "cna", neurons, n_layers=2, neurons_per_layer=16, k_fraction=len(neurons) / 32)
    resamples = 10
    membership = torch.zeros(resamples, len(frequencies), dtype=torch.bool)
    for column, share in enumerate(frequencies):
        membership[: round(share * resamples), column] = True
    stability = Stability(circuit=[n.key for n in neurons], membership=membership,
                          candidates=torch.arange(len(frequencies)), width=16, fraction=0.5, sizes=(5, 5),
                          halves=(set(), set()), reproduced=True)
    return circuit, stability


def test_the_core_and_the_rest_are_disjoint_subsets_of_the_circuit():
    circuit, stability = _stability([1.0, 0.9, 0.8, 0.7, 0.5, 0.3, 0.1, 0.0])
    core = subset_circuit(circuit, stability, "core")
    assert [n.key for n in core.neurons] == [(0, 0), (0, 1), (0, 2)]
    assert core.settings["stability_subset"] == "core" and core.settings["subset_of_k"] == 8
    assert core.k_fraction == 3 / 32
    rest = subset_circuit(circuit, stability, "rest", seed=1)
    assert rest.k == 3 and {n.key for n in rest.neurons} <= {(0, i) for i in range(3, 8)}
    assert [n.key for n in subset_circuit(circuit, stability, "rest", seed=1).neurons] == [n.key for n in rest.neurons]
    assert {tuple(n.key) for seed in range(20) for n in subset_circuit(circuit, stability, "rest", seed).neurons} == {
        (0, i) for i in range(3, 8)}  # every unstable neuron can be drawn
    assert subset_circuit(circuit, stability, "full") is circuit


def test_a_short_rest_gives_all_it_has_and_core_matched_as_many_from_the_core():
    circuit, stability = _stability([1.0, 1.0, 0.9, 0.2, 0.1])
    rest = subset_circuit(circuit, stability, "rest")
    assert [n.key for n in rest.neurons] == [(0, 3), (0, 4)]
    assert (rest.settings["core_size"], rest.settings["rest_size"]) == (3, 2)
    matched = {seed: [n.key for n in subset_circuit(circuit, stability, "core_matched", seed).neurons]
               for seed in range(12)}
    assert all(len(keys) == 2 and set(keys) <= {(0, 0), (0, 1), (0, 2)} for keys in matched.values())
    assert len({tuple(keys) for keys in matched.values()}) == 3  # each pair of the three core neurons is drawn


def test_an_empty_core_or_rest_is_one_error():
    circuit, stability = _stability([0.7, 0.2])
    with pytest.raises(CnaError, match="stable core is empty"):
        subset_circuit(circuit, stability, "core")
    circuit, stability = _stability([0.9, 1.0])
    with pytest.raises(CnaError, match="core_matched: every circuit neuron is in the stable core"):
        subset_circuit(circuit, stability, "core_matched")


def test_an_older_circuit_file_has_no_frequencies_and_is_written_back_as_it_was():
    old = {"model": "m", "method": "cna", "k": 1, "k_fraction": 0.5, "n_layers": 1, "neurons_per_layer": 2,
           "neurons": [{"layer": 0, "index": 1, "delta": 0.5}]}
    circuit = Circuit.from_dict(old)
    assert circuit.neurons[0].selection_frequency is None and circuit.stability == {}
    written = circuit.to_dict()
    assert "stability" not in written and "selection_frequency" not in written["neurons"][0]


def test_a_job_records_frequencies_and_steers_its_core_then_its_rest(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    common = ("method.k=6", "method.stability.resamples=12", "alphas=[1.0]")
    core = run(small_job(tiny_folder, cache, *common, "method.stability.steer=core"), tmp_path / "core")
    saved = json.loads((tmp_path / "core" / CIRCUIT).read_text())
    stability = saved["stability"]
    assert stability["resamples"] == 12 and stability["k"] == 6 and stability["reproduced"]
    assert saved["k"] == stability["core_size"] >= 1 and saved["settings"]["stability_subset"] == "core"
    assert [[n["layer"], n["index"]] for n in saved["neurons"]] == stability["core"]
    assert all(n["selection_frequency"] >= 0.8 for n in saved["neurons"])
    assert "neuron_cards" in core["timings_s"]
    cards = json.loads((tmp_path / "core" / "neurons.json").read_text())["cards"]
    assert [(c["layer"], c["index"]) for c in cards] == [(n["layer"], n["index"]) for n in saved["neurons"]]
    misses = core["cache"]["misses"]
    # The same pool's per-prompt values come from the cache: the rest job records nothing again.
    rest = run(small_job(tiny_folder, cache, *common, "method.stability.steer=rest"), tmp_path / "rest")
    assert rest["cache"]["misses"] == 0 and rest["cache"]["hits"] == misses
    rest_circuit = json.loads((tmp_path / "rest" / CIRCUIT).read_text())
    assert rest_circuit["stability"] == stability
    keys = {(n["layer"], n["index"]) for n in rest_circuit["neurons"]}
    assert keys and not keys & {tuple(key) for key in stability["core"]}
    assert len(keys) == min(stability["core_size"], stability["k"] - stability["core_size"])
    assert json.loads((tmp_path / "rest" / RESULTS).read_text())["status"] == "complete"


def test_per_prompt_gradients_sum_to_the_streamed_ones_on_a_mixture_of_experts():
    """The per-prompt path shares the streamed pass's openings: routed and shared experts' columns alike."""
    adapter = ArchitectureAdapter(tiny_moe("qwen2_moe", seed=2))
    prompts = random_prompts(6, seed=21)
    metric = refusal_log_odds([REFUSAL_TOKEN])
    common = dict(pad_token_id=0, batch_size=3, progress=False)
    streamed = collect_gradients(adapter, prompts, metric, **common)
    neurons = torch.arange(adapter.n_layers * adapter.neurons_per_layer)
    activation_gradient, gradient = collect_prompt_gradients(adapter, prompts, metric, neurons, **common)
    assert streamed.gradient_sum.abs().max() > 0
    torch.testing.assert_close(gradient.sum(0), streamed.gradient_sum.flatten(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(activation_gradient.sum(0), streamed.activation_gradient_sum.flatten(),
                               rtol=1e-9, atol=1e-12)


def test_stability_on_a_mixture_of_experts_is_refused_before_it_loads_and_in_the_library(tmp_path):
    folder = write_tiny_model(tmp_path / "moe", family="qwen3_moe")

    def job(*overrides: str):
        return compose_job(["model=tiny_moe", f"model.path={folder}", "logger=none", *overrides])

    validate(job())  # the default cna job (cards on) runs on a mixture of experts
    with pytest.raises(ConfigError, match="^method.stability.resamples: expected 0 for tiny-moe, a mixture of "
                                          r"experts \(stability supports dense models only\), got 4$"):
        validate(job("method.stability.resamples=4"))
    circuit = Circuit("tiny-moe", "cna", [Neuron(1, 3, 1.0, 1.0, 0.0, expert=2)], 2, 256)
    values = PromptValues(torch.tensor([259]), torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(CnaError, match="^circuit stability: tiny-moe's circuit has neurons of a mixture of experts"):
        measure_stability(values, circuit, score="delta", sign="positive", resamples=2, fraction=0.5)
