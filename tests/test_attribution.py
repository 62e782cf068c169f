"""Causal neuron scores: a planted causal neuron beats an equally contrastive distractor; gradients match
finite differences; the model is left as it was; the target score's data checks."""

import copy
import json

import pytest
import torch

from cna.attribution import (
    GradientStatistics,
    collect_gradients,
    refusal_log_odds,
    score_neurons,
    target_metric,
)
from cna.cache import StatisticsCache, statistics_key
from cna.data import PromptSource
from cna.discovery import collect_statistics, select_circuit
from cna.errors import ConfigError
from cna.hooks import attached, hook_count, map_input
from cna.interventions import NeuronScale
from cna.models import ArchitectureAdapter
from cna.tiny import HIDDEN, tiny_llama, tiny_tokenizer
from conftest import random_prompts

TRIGGER, PLAIN_END, REFUSAL_TOKEN = 7, 8, 60
CAUSAL, DISTRACTOR = (2, 5), (2, 6)
DIRECTION_LAYER = 1  # r is measured before the planted layer, so their output weights cannot change it


def _statistics(adapter, prompts):
    return collect_statistics(adapter, prompts, pad_token_id=0, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama with two layer-2 neurons that fire only when a prompt ends with the trigger token.

    Both read the same direction u, so their deltas are equal and the largest. The causal neuron writes
    along r (the residual mean difference at layer 1), and the refusal token's unembedding reads r; the
    distractor writes along a direction orthogonal to r that no unembedding row reads. The final norm is made
    linear (a huge epsilon fixes its scale), so that direction cannot reach the logits through the norm either.
    """
    model = tiny_llama(seed=1).double()
    adapter = ArchitectureAdapter(model)
    generator = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(HIDDEN, generator=generator, dtype=torch.float64), dim=0)
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding -= (embedding @ u).unsqueeze(-1) * u
        embedding[TRIGGER] += 10 * u
        mlp = model.model.layers[CAUSAL[0]].mlp
        for _, index in (CAUSAL, DISTRACTOR):
            mlp.gate_proj.weight[index] = 3 * u
            mlp.up_proj.weight[index] = 3 * u
    positive = [p[:-1] + [TRIGGER] for p in random_prompts(12, seed=4)]
    negative = [p[:-1] + [PLAIN_END] for p in random_prompts(12, seed=5)]
    before = _statistics(adapter, positive), _statistics(adapter, negative)
    r = before[0].residual_mean[DIRECTION_LAYER] - before[1].residual_mean[DIRECTION_LAYER]
    r = r / r.norm()
    off = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    off = torch.nn.functional.normalize(off - (off @ r) * r, dim=0)
    with torch.no_grad():
        mlp.down_proj.weight[:, CAUSAL[1]] = 2 * r
        mlp.down_proj.weight[:, DISTRACTOR[1]] = 2 * off
        unembedding = model.lm_head.weight
        unembedding -= (unembedding @ off).unsqueeze(-1) * off
        model.model.norm.variance_epsilon = 1e6  # rms(h) ~ 1000 whatever h is
        unembedding[REFUSAL_TOKEN] = 5000 * r
    return adapter, positive, negative


def _scores(planted, score):
    adapter, positive, negative = planted
    gradients = collect_gradients(adapter, positive, refusal_log_odds([REFUSAL_TOKEN]), pad_token_id=0,
                                  batch_size=4, progress=False)
    return score_neurons(score, _statistics(adapter, positive), _statistics(adapter, negative), adapter,
                         direction_layer=DIRECTION_LAYER, gradients=gradients)


def _top(scores, k):
    circuit = select_circuit(scores, model="tiny", k=k, sign="positive")
    return [n.key for n in circuit.neurons], circuit


def test_delta_picks_the_causal_neuron_and_the_distractor_alike(planted):
    top, circuit = _top(_scores(planted, "delta"), 2)
    assert set(top) == {CAUSAL, DISTRACTOR} and circuit.score == "delta"
    assert circuit.neurons[0].delta == pytest.approx(circuit.neurons[1].delta, rel=1e-9)


@pytest.mark.parametrize("score", ["projection", "attribution"])
def test_causal_scores_pick_the_causal_neuron_and_drop_the_distractor(planted, score):
    scores = _scores(planted, score)
    top, circuit = _top(scores, 1)
    assert top == [CAUSAL] and circuit.score == score and circuit.to_dict()["score"] == score
    assert circuit.neurons[0].score == float(scores.value[CAUSAL])
    causal, distractor = float(scores.value[CAUSAL]), float(scores.value[DISTRACTOR])
    assert causal > 0 and abs(distractor) < 0.05 * causal


def _metric_at(adapter, prompt, metric, layer, index, shift):
    """M for one prompt with neuron (layer, index) shifted by `shift` at the last token."""
    def shifted(x):
        x = x.clone()
        x[:, -1, index] += shift
        return x

    with attached([map_input(adapter.neuron_sites[layer], shifted)]), torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([prompt])).logits[:, -1]
    return float(metric(logits, [0])[0])


def test_attribution_equals_a_finite_difference_estimate():
    """Batched and left-padded gradients equal central differences taken one unpadded prompt at a time."""
    adapter = ArchitectureAdapter(tiny_llama(seed=3).double())
    positive, negative = random_prompts(6, seed=6), random_prompts(6, seed=7)
    metric = refusal_log_odds([REFUSAL_TOKEN, REFUSAL_TOKEN + 1])
    gradients = collect_gradients(adapter, positive, metric, pad_token_id=0, batch_size=4, progress=False)
    positive_stats, negative_stats = _statistics(adapter, positive), _statistics(adapter, negative)
    scores = score_neurons("attribution", positive_stats, negative_stats, adapter, direction_layer=0,
                           gradients=gradients)
    for layer, index in [(0, 3), (1, 40), (2, 100), (2, 127)]:
        estimate = 0.0
        for prompt in positive:
            eps = 1e-3  # Llama's RMSNorm computes in float32 even in a float64 model: smaller steps drown in rounding
            slope = (_metric_at(adapter, prompt, metric, layer, index, eps)
                     - _metric_at(adapter, prompt, metric, layer, index, -eps)) / (2 * eps)
            activation = float(_statistics(adapter, [prompt]).neuron_sum[layer, index])
            estimate += (activation - float(negative_stats.neuron_mean[layer, index])) * slope
        assert float(scores.value[layer, index]) == pytest.approx(estimate / len(positive), rel=1e-3, abs=1e-7)


def test_the_gradient_pass_leaves_the_model_exactly_as_it_was():
    model = tiny_llama(seed=2)
    adapter = ArchitectureAdapter(model)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)  # a caller's flag, to be given back
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.inference_mode():  # a caller's mode must not switch the gradients off
        gradients = collect_gradients(adapter, random_prompts(5, seed=8), refusal_log_odds([REFUSAL_TOKEN]),
                                      pad_token_id=0, batch_size=2, progress=False)
    assert gradients.gradient_sum.abs().sum() > 0
    assert hook_count(model) == 0 and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.layers.1.mlp.up_proj.weight"]
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_alpha_zero_is_bit_identical_for_an_attribution_circuit(planted):
    _, circuit = _top(_scores(planted, "attribution"), 3)
    adapter = ArchitectureAdapter(copy.deepcopy(planted[0].model).float())  # steering computes in float32
    ids = torch.tensor([planted[1][0]])
    with torch.no_grad():
        plain = adapter.model(input_ids=ids).logits
        with NeuronScale(adapter, circuit).steer(0.0):
            steered = adapter.model(input_ids=ids).logits
        with NeuronScale(adapter, circuit).steer(1.0):
            ablated = adapter.model(input_ids=ids).logits
    assert torch.equal(plain, steered) and not torch.equal(plain, ablated)


def test_gradient_statistics_round_trip_through_the_cache_under_their_own_key(tmp_path):
    common = dict(model={"source": "tiny"}, site="llama:mlp.down_proj", prompts=[[4, 5]], position="last",
                  top_fraction=None)
    activations = statistics_key(**common)
    assert statistics_key(**common, score=None) == activations
    attribution = statistics_key(**common, score={"score": "attribution", "tokens": [60]})
    other_tokens = statistics_key(**common, score={"score": "attribution", "tokens": [61]})
    assert len({activations, attribution, other_tokens}) == 3
    saved = GradientStatistics(3, torch.arange(6.0).double().view(2, 3), -torch.ones(2, 3).double())
    cache = StatisticsCache(tmp_path)
    assert cache.get_or_compute(attribution, lambda: saved, load=GradientStatistics.load) is saved
    loaded = cache.get_or_compute(attribution, lambda: pytest.fail("computed twice"), load=GradientStatistics.load)
    assert (cache.hits, loaded.n_prompts) == (1, 3)
    assert torch.equal(loaded.activation_gradient_sum, saved.activation_gradient_sum)
    assert torch.equal(loaded.gradient_sum, saved.gradient_sum)


def _target_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sides(path):
    """The positive and negative sets of one file, told apart by its `set` field ("p" or "n")."""
    return {side: PromptSource(path=path, column="prompt", where={"set": side[0]}) for side in ("positive", "negative")}


def test_the_target_metric_is_target_minus_counterfactual_logit_of_the_paired_prompt(tmp_path):
    rows = [{"prompt": "w5 w6", "target": "yes", "set": "p"}, {"prompt": "w7 w8", "target": "A", "set": "p"},
            {"prompt": "w9 w5", "target": "no", "set": "n"}, {"prompt": "w6 w9", "target": "B", "set": "n"}]
    path = str(_target_file(tmp_path, rows))
    sources = _sides(path)
    tokenizer = tiny_tokenizer()
    metric, identity = target_metric(tokenizer, ["w5 w6", "w7 w8"], ["w9 w5", "w6 w9"], sources)
    ids = tokenizer.convert_tokens_to_ids
    assert identity == {"score": "target", "targets": ids(["yes", "A"]), "counterfactuals": ids(["no", "B"])}
    logits = torch.randn(2, 64, dtype=torch.float64)
    expected = [logits[0, ids("A")] - logits[0, ids("B")], logits[1, ids("yes")] - logits[1, ids("no")]]
    assert torch.equal(metric(logits, [1, 0]), torch.stack(expected))


def test_the_target_score_names_the_prompt_set_without_targets(tmp_path):
    path = str(_target_file(tmp_path, [{"prompt": "w5 w6", "set": "p"}, {"prompt": "w9 w5", "set": "n"}]))
    sources = _sides(path)
    with pytest.raises(ConfigError, match=r"^prompts\.positive: method\.score=target needs a `target`"):
        target_metric(tiny_tokenizer(), ["w5 w6"], ["w9 w5"], sources)
    with pytest.raises(ConfigError, match="equal sizes"):
        target_metric(tiny_tokenizer(), ["w5 w6"], [], sources)
