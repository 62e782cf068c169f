"""Neuron cards: the planted writer's card shows the token its output weight was built to promote (through the final
norm's weight), its prompts and its selection frequency; the effect estimate is attribution's; the page round-trips."""

import copy

import pytest
import torch

from cna.attribution import collect_gradients, refusal_log_odds, score_neurons
from cna.circuit import Circuit, Neuron
from cna.discovery import collect_statistics, eligible_ranking, select_circuit
from cna.errors import CnaError
from cna.models import ArchitectureAdapter
from cna.neurons import CARDS_MD, eligible_ranks, neuron_cards, read_cards, token_effects, write_cards
from cna.stability import PromptValues, candidate_neurons, measure_stability, record_prompt_values, with_frequencies
from cna.tiny import tiny_moe, tiny_tokenizer
from conftest import FAMILY_CONFIGS, planted_model, tiny_model


def _statistics(adapter, prompts):
    return collect_statistics(adapter, prompts, pad_token_id=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def planted_cards():
    """Cards of the planted model's positive circuit, with stability measured and attribution gradients."""
    planted = planted_model()
    adapter = planted.adapter
    positive = planted.prompts(24, 1, planted.positive_trigger)
    negative = planted.prompts(24, 2, planted.negative_trigger)
    metric = refusal_log_odds([planted.promoted_token])
    gradients = collect_gradients(adapter, positive, metric, pad_token_id=0, batch_size=8, progress=False)
    scores = score_neurons("delta", _statistics(adapter, positive), _statistics(adapter, negative), adapter,
                           direction_layer=0)
    universal = torch.zeros_like(scores.delta, dtype=torch.bool)
    universal[planted.universal_neuron] = True  # what the filter finds on a diverse set (test_discovery)
    circuit = select_circuit(scores, model="planted", k=3, sign="positive", universal=universal)
    pool = candidate_neurons(scores, k=3, sign="positive", universal=universal, count=40)
    common = dict(pad_token_id=0, batch_size=8, progress=False)
    values = PromptValues(pool, record_prompt_values(adapter, positive, pool, **common)[0],
                          record_prompt_values(adapter, negative, pool, **common)[0])
    circuit = with_frequencies(circuit, measure_stability(values, circuit, score="delta", sign="positive",
                                                          resamples=30, fraction=0.5))
    texts = {"positive": [f"positive prompt {i}" for i in range(24)],
             "negative": [f"negative prompt {i}" for i in range(24)]}
    ranks = eligible_ranks(eligible_ranking(scores.ranking, "positive", universal=universal), adapter.neurons_per_layer,
                           [n.key for n in circuit.neurons])
    cards = neuron_cards(adapter, tiny_tokenizer(), circuit, values, positive=texts["positive"],
                         negative=texts["negative"], ranks=ranks, gradients=gradients,
                         negative_mean=scores.negative_mean, tokens=5, prompts=2)
    return planted, circuit, cards, gradients, scores


def test_the_planted_writer_card_shows_the_token_it_was_built_to_promote(planted_cards):
    planted, circuit, cards, _, _ = planted_cards
    card = next(card for card in cards if (card.layer, card.index) == planted.writer)
    name = tiny_tokenizer().convert_ids_to_tokens
    assert card.promoted[0][0] == name(planted.promoted_token)
    # The decoy is promoted most when the final norm's weight is left out, second when it is applied.
    assert card.promoted[1][0] == name(planted.decoy_token)
    assert card.promoted[0][1] / card.promoted[1][1] == pytest.approx(20 / 17.5, rel=1e-4)
    assert card.suppressed[0][0] == name(planted.suppressed_token)
    assert card.selection_frequency == 1.0
    assert card.rank == [n.key for n in circuit.neurons].index(planted.writer) + 1
    # It fires on prompts that end with the positive trigger: the most active are positive, the least negative.
    assert [row["set"] for row in card.most_active] == ["positive", "positive"]
    assert [row["set"] for row in card.least_active] == ["negative", "negative"]
    assert card.most_active[0]["value"] > card.most_active[1]["value"] > card.least_active[0]["value"]


def test_every_card_follows_the_circuit_and_a_silent_writer_promotes_nothing(planted_cards):
    planted, circuit, cards, _, _ = planted_cards
    assert [(c.layer, c.index) for c in cards] == [n.key for n in circuit.neurons]
    assert [c.rank for c in cards] == [1, 2, 3]
    for card in cards:
        if (card.layer, card.index) != planted.writer:  # output weights zeroed: every logit is 0
            assert all(value == 0 for _, value in card.promoted + card.suppressed)


def test_the_effect_estimate_is_attribution_patching(planted_cards):
    """Patched: minus the attribution score; ablated: minus the mean of a x dM/da (the writer raises M)."""
    planted, _, cards, gradients, scores = planted_cards
    attribution = score_neurons("attribution", *_planted_statistics(planted), planted.adapter, direction_layer=0,
                                gradients=gradients).value
    for card in cards:
        assert card.effect_patched == pytest.approx(-float(attribution[card.layer, card.index]), rel=1e-9, abs=1e-12)
        ablated = float(gradients.activation_gradient_sum[card.layer, card.index]) / gradients.n_prompts
        assert card.effect_ablated == pytest.approx(-ablated)
    writer = next(card for card in cards if (card.layer, card.index) == planted.writer)
    assert writer.effect_ablated < 0 and writer.effect_patched < 0  # taking it away lowers the promoted token


def _planted_statistics(planted):
    return (_statistics(planted.adapter, planted.prompts(24, 1, planted.positive_trigger)),
            _statistics(planted.adapter, planted.prompts(24, 2, planted.negative_trigger)))


def test_the_page_and_its_data_round_trip(planted_cards, tmp_path):
    planted, circuit, cards, _, _ = planted_cards
    header = {"model": "planted", "method": "cna", "score": "delta", "sign": "positive", "k": 3,
              "metric": "the refusal log-odds", "stability": circuit.stability}
    written = write_cards(tmp_path, cards, header)
    page = written["markdown"].read_text()
    assert written["markdown"] == tmp_path / CARDS_MD
    writer = f"L{planted.writer[0]}/N{planted.writer[1]}"
    assert f"### {writer} (rank" in page and "`w40` (+" in page and "selection frequency | 1.00" in page
    assert "Stability: 30 resamples of 50%" in page and "weight applied" in page
    read_header, read_back = read_cards(tmp_path)
    assert read_back == cards and read_header["metric"] == "the refusal log-odds"
    assert read_cards(tmp_path / "nothing") is None


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_token_effects_read_every_family(family):
    adapter = ArchitectureAdapter(tiny_model(family))
    effects = token_effects(adapter, tiny_tokenizer(), [(0, 3), (1, 5), (1, 6)], top=4)
    promoted, suppressed = effects[(1, 5)]
    assert len(promoted) == len(suppressed) == 4
    assert promoted[0][1] > 0 > suppressed[0][1] and all(map(torch.isfinite, torch.tensor(
        [v for _, v in promoted + suppressed])))


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_a_norm_treats_the_write_as_documented(family):
    """A LayerNorm's centring is kept (a constant added to a write changes nothing), an RMSNorm's is not; the write's
    own scale never changes a logit (the norm divides by it; the write is made large so the norm's epsilon is
    negligible beside it)."""
    model = tiny_model(family)
    with torch.no_grad():
        ArchitectureAdapter(model).neuron_weights(1)[5] *= 100.0
    before = ArchitectureAdapter(model).neuron_logits(1, torch.tensor([5]))
    shifted_adapter = ArchitectureAdapter(copy.deepcopy(model))
    with torch.no_grad():
        shifted_adapter.neuron_weights(1)[5] *= 3.0
    torch.testing.assert_close(shifted_adapter.neuron_logits(1, torch.tensor([5])), before, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        shifted_adapter.neuron_weights(1)[5] += 0.5
    after = shifted_adapter.neuron_logits(1, torch.tensor([5]))
    if family == "llama":
        assert not torch.allclose(after, before, rtol=1e-3, atol=1e-4)
    else:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_token_text_is_escaped_once_in_a_card_and_once_in_the_report(tmp_path):
    from cna.neurons import NeuronCard, render_card
    from cna.report.summary import _table

    card = NeuronCard(3, 7, 1, 0.5, 0.5, 0.6, 0.1, None, [("a|b", 2.0), (" ", 1.0), ("\n", 0.5)], [("`x`", -1.0)])
    table_rows = [line for line in render_card(card, None) if line.startswith("| promotes")]
    assert table_rows == ["| promotes | `a\\|b` (+2.00), `␣` (+1.00), `\\n` (+0.50) |"]
    assert "`'x'` (-1.00)" in "\n".join(render_card(card, None))
    assert card.table_row()["promoted"] == "`a|b`, `␣`, `\\n`"  # W&B: no markdown escapes
    assert _table(["promotes"], [[card.table_row()["promoted"]]])[2] == "| `a\\|b`, `␣`, `\\n` |"


def test_a_mixture_of_experts_block_is_not_read_as_a_norm_and_expert_neurons_get_no_cards():
    """DeepSeek-V3's layer 0 is dense: its MLP block is the family's `mlp_out`, which a write must not pass through;
    only the final norm and the unembedding apply. MoE layers and expert circuits are refused in one line."""
    model = tiny_moe("deepseek_v3", seed=1)
    adapter = ArchitectureAdapter(model)
    indices = torch.tensor([2, 7])
    writes = adapter.neuron_weights(0)[indices]
    norm = model.get_submodule("model.norm")
    with torch.no_grad():
        expected = (norm(writes) - norm(torch.zeros_like(writes[:1]))) @ model.get_output_embeddings().weight.t()
    torch.testing.assert_close(adapter.neuron_logits(0, indices), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(CnaError, match="^layer 1 is a mixture of experts: neuron_logits reads a dense layer's"):
        adapter.neuron_logits(1, indices)
    circuit = Circuit("tiny-moe", "cna", [Neuron(1, 3, 1.0, 1.0, 0.0, expert=2)], adapter.n_layers,
                      adapter.neurons_per_layer)
    values = PromptValues(torch.tensor([3]), torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(CnaError, match="^neuron cards: tiny-moe's circuit has neurons of a mixture of experts"):
        neuron_cards(adapter, tiny_tokenizer(), circuit, values, positive=["a", "b"], negative=["c", "d"], ranks={})
