import pytest
import torch

from cna.discovery import (
    ActivationStatistics,
    NeuronScores,
    collect_statistics,
    contrastive_scores,
    layer_at_fraction,
    random_circuit,
    rank_neurons,
    residual_direction,
    resolve_k,
    resolve_layer_range,
    select_circuit,
    universal_neurons,
)
from cna.errors import ConfigError
from cna.models import ArchitectureAdapter
from cna.tiny import tiny_llama
from conftest import planted_model, random_prompts


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def planted_scores(planted):
    positive = collect_statistics(planted.adapter, planted.prompts(24, 1, planted.positive_trigger),
                                  pad_token_id=0, batch_size=8, progress=False)
    negative = collect_statistics(planted.adapter, planted.prompts(24, 2, planted.negative_trigger),
                                  pad_token_id=0, batch_size=8, progress=False)
    return contrastive_scores(positive, negative)


@pytest.fixture(scope="module")
def planted_universal(planted):
    diverse = collect_statistics(planted.adapter, planted.prompts(30, 3, None), pad_token_id=0,
                                 top_fraction=0.01, progress=False)
    return universal_neurons(diverse, threshold=0.8)


def keys(circuit):
    return {n.key for n in circuit.neurons}


def test_discovery_finds_exactly_the_planted_neurons(planted, planted_scores):
    planted_keys = {*planted.positive_neurons, *planted.negative_neurons, planted.universal_neuron}
    circuit = select_circuit(planted_scores, model="planted", k=len(planted_keys))
    assert keys(circuit) == planted_keys
    # Ranked by |delta|: the universal neuron reads the trigger most strongly.
    assert circuit.neurons[0].key == planted.universal_neuron


def test_sign_selects_one_side_of_the_contrast(planted, planted_scores):
    positive = select_circuit(planted_scores, model="planted", k=4, sign="positive")
    negative = select_circuit(planted_scores, model="planted", k=1, sign="negative")
    assert keys(positive) == {*planted.positive_neurons, planted.universal_neuron}
    assert keys(negative) == set(planted.negative_neurons)
    assert all(n.delta > 0 for n in positive.neurons) and negative.neurons[0].delta < 0


def test_universal_filter_flags_the_always_on_neuron_and_refills(planted, planted_scores, planted_universal):
    assert planted_universal.nonzero().tolist() == [list(planted.universal_neuron)]
    exact = select_circuit(planted_scores, model="planted", k=4, universal=planted_universal)
    assert keys(exact) == {*planted.positive_neurons, *planted.negative_neurons}
    refilled = select_circuit(planted_scores, model="planted", k=5, universal=planted_universal)
    assert refilled.k == 5 and refilled.universal_removed == 1
    assert planted.universal_neuron not in keys(refilled)
    assert keys(exact) < keys(refilled)
    assert refilled.settings["universal_flagged"] == 1


def test_universal_filter_threshold_counts_prompts():
    counts = torch.tensor([[10, 8, 7], [0, 9, 10]])
    stats = ActivationStatistics(10, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64),
                                 "last", 0.001, counts)
    assert universal_neurons(stats, 0.8).tolist() == [[True, True, False], [False, True, True]]
    assert universal_neurons(stats, 1.0).tolist() == [[True, False, False], [False, False, True]]
    with pytest.raises(ConfigError, match="threshold"):
        universal_neurons(stats, 0.0)


@pytest.fixture(scope="module")
def random_model_adapter():
    return ArchitectureAdapter(tiny_llama(seed=3))


@pytest.mark.parametrize("position", ["last", "mean"])
def test_statistics_do_not_depend_on_padding_side_batch_size_or_token_budget(random_model_adapter, position):
    prompts = random_prompts(16, seed=4)
    runs = [
        collect_statistics(random_model_adapter, prompts, pad_token_id=0, batch_size=batch, padding_side=side,
                           max_batch_tokens=budget, position=position, top_fraction=0.05, progress=False)
        for side, batch, budget in [("left", 16, None), ("right", 16, None), ("left", 1, None), ("right", 5, None),
                                    ("left", 16, 30)]
    ]
    reference = runs[0]
    for other in runs[1:]:
        torch.testing.assert_close(other.neuron_sum, reference.neuron_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other.residual_sum, reference.residual_sum, rtol=1e-5, atol=1e-5)
        assert torch.equal(other.top_counts, reference.top_counts)


def test_last_token_value_is_the_last_real_token(random_model_adapter):
    """One prompt alone, no padding: the recorded value equals the neuron input at the final position."""
    prompt = random_prompts(1, seed=5)[0]
    captured = {}
    site = random_model_adapter.neuron_sites[1]

    def capture_first_call(_module, args):
        captured.setdefault("x", args[0][0, -1].clone())

    handle = site.register_forward_pre_hook(capture_first_call)
    try:
        stats = collect_statistics(random_model_adapter, [prompt, prompt[:3]], pad_token_id=0, progress=False)
        alone = collect_statistics(random_model_adapter, [prompt[:3]], pad_token_id=0, progress=False)
    finally:
        handle.remove()
    # The longer prompt runs first (length-sorted batches) and is unpadded in its batch.
    torch.testing.assert_close((stats.neuron_sum[1] - alone.neuron_sum[1]).float(), captured["x"],
                               rtol=1e-5, atol=1e-5)


def test_statistics_are_streamed_sums_of_layer_by_neuron_size(random_model_adapter):
    stats = collect_statistics(random_model_adapter, random_prompts(40, seed=6), pad_token_id=0, batch_size=7,
                               progress=False)
    adapter = random_model_adapter
    assert stats.n_prompts == 40
    assert stats.neuron_sum.shape == (adapter.n_layers, adapter.neurons_per_layer)
    assert stats.neuron_sum.dtype == torch.float64
    assert stats.residual_sum.shape == (adapter.n_layers, adapter.hidden_size)


def test_statistics_save_and_load_round_trip(random_model_adapter, tmp_path):
    stats = collect_statistics(random_model_adapter, random_prompts(6, seed=7), pad_token_id=0,
                               top_fraction=0.01, progress=False)
    loaded = ActivationStatistics.load(stats.save(tmp_path / "stats.safetensors"))
    assert loaded.n_prompts == 6 and loaded.position == "last" and loaded.top_fraction == 0.01
    assert torch.equal(loaded.neuron_sum, stats.neuron_sum) and torch.equal(loaded.top_counts, stats.top_counts)


def test_empty_prompt_set_is_a_one_line_error(random_model_adapter):
    with pytest.raises(ConfigError, match="empty"):
        collect_statistics(random_model_adapter, [], pad_token_id=0, desc="positive")


@pytest.mark.parametrize(("total", "fraction", "expected"), [(46_080, 0.001, 46), (116_736, 0.001, 117),
                                                             (100, 0.0001, 1), (100, 1.0, 100)])
def test_k_from_a_fraction_of_all_neurons(total, fraction, expected):
    assert resolve_k(total, k_fraction=fraction) == expected


@pytest.mark.parametrize("kwargs", [{"k_fraction": 0.0}, {"k_fraction": 1.5}, {"k": 0}, {"k": 101},
                                    {"k_fraction": 0.1, "k": 3}, {}])
def test_bad_k_is_rejected(kwargs):
    with pytest.raises(ConfigError, match="k"):
        resolve_k(100, **kwargs)


def scores_from_delta(delta: torch.Tensor) -> NeuronScores:
    delta = delta.double()
    return NeuronScores(delta, delta, torch.zeros_like(delta))


def test_ties_break_by_layer_then_index():
    delta = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.5, 1.0]])
    assert rank_neurons(delta).tolist()[:4] == [1, 2, 3, 5]
    circuit = select_circuit(scores_from_delta(delta), model="m", k=3)
    assert [n.key for n in circuit.neurons] == [(0, 1), (0, 2), (1, 0)]
    assert circuit.k_fraction == 0.5 and circuit.settings["k_requested"] == 3


def test_layer_range_restricts_the_circuit():
    delta = torch.arange(12.0).view(4, 3)
    circuit = select_circuit(scores_from_delta(delta), model="m", k=4, layers=(1, 3))
    assert {n.layer for n in circuit.neurons} == {1, 2}
    assert [n.key for n in circuit.neurons] == [(2, 2), (2, 1), (2, 0), (1, 2)]
    with pytest.raises(ConfigError, match="layer range"):
        select_circuit(scores_from_delta(delta), model="m", k=1, layers=(2, 5))


def test_layer_ranges_by_index_or_by_fraction_of_depth():
    assert resolve_layer_range(None, 24) is None
    assert resolve_layer_range([3, 7], 24) == (3, 7) and resolve_layer_range([20, None], 24) == (20, 24)
    # Fractions widen to whole layers, so the range covers at least the fraction asked for.
    assert resolve_layer_range([0.9, 1.0], 24) == (21, 24)  # 2.4 layers asked: the final 3
    assert resolve_layer_range([0.9, 1.0], 30) == (27, 30)  # exactly the final 10%
    assert resolve_layer_range([0.9, None], 30) == (27, 30)
    assert resolve_layer_range([0.0, 0.5], 24) == (0, 12)
    assert resolve_layer_range([0, 1.0], 24) == (0, 24)  # one float makes it the fraction form
    with pytest.raises(ConfigError, match=r"method.layers: \[30, 40\) is not within \[0, 24\)"):
        resolve_layer_range([30, 40], 24)


def test_unknown_sign_is_rejected():
    with pytest.raises(ConfigError, match="sign 'both'"):
        select_circuit(scores_from_delta(torch.ones(2, 2)), model="m", k=1, sign="both")


def test_random_control_matches_layer_counts_and_avoids_the_circuit(planted_scores):
    circuit = select_circuit(planted_scores, model="planted", k=6)
    control = random_circuit(circuit, planted_scores, seed=0)
    assert control.method == "random" and control.layer_counts == circuit.layer_counts
    assert not {n.key for n in control.neurons} & {n.key for n in circuit.neurons}
    assert control.neurons == random_circuit(circuit, planted_scores, seed=0).neurons
    assert control.neurons != random_circuit(circuit, planted_scores, seed=1).neurons
    assert all(n.delta == float(planted_scores.delta[n.layer, n.index]) for n in control.neurons)


def test_residual_direction_is_the_mean_difference(random_model_adapter):
    positive = collect_statistics(random_model_adapter, random_prompts(5, seed=8), pad_token_id=0, progress=False)
    negative = collect_statistics(random_model_adapter, random_prompts(7, seed=9), pad_token_id=0, progress=False)
    direction = residual_direction(positive, negative, model="m", method="caa", source_layer=1, layers=[1])
    expected = positive.residual_sum[1] / 5 - negative.residual_sum[1] / 7
    torch.testing.assert_close(torch.tensor(direction.vector, dtype=torch.float64), expected)
    assert layer_at_fraction(24, 0.5) == 12 and layer_at_fraction(24, 1.0) == 23
