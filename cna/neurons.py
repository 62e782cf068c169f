"""Neuron cards: what each circuit neuron is, on one page (`neurons.md`, with its data in `neurons.json`).

For every neuron of a circuit:
- where it sits and how it was chosen: layer, index, rank among the eligible neurons (1 = best by the recipe's
  score and sign, universal neurons left out), the score, delta and the two sets' means, and the selection
  frequency where stability was measured (`cna.stability`);
- what it writes: the tokens its output weight promotes and suppresses, read straight through to the unembedding
  (`ArchitectureAdapter.neuron_logits`: each norm's weight applied as norm(w) - norm(0), no bias, no rest of the
  residual);
- what drives it: the discovery prompts on which it is most and least active (its value at the token that stands
  for a prompt, as discovery reads it);
- what it does to the behaviour, to first order, where gradients of the behaviour metric M are at hand
  (`cna.attribution`): the change in M if it were patched from each positive prompt's value to its negative-set
  mean, -(mean over positives of (a - negative mean) x dM/da), and if it were ablated (m = 0), -(mean of a x dM/da).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cna.attribution import GradientStatistics
from cna.circuit import Circuit
from cna.io import read_json, write_json_atomic, write_text_atomic
from cna.models import ArchitectureAdapter
from cna.stability import PromptValues, require_dense

CARDS_JSON, CARDS_MD = "neurons.json", "neurons.md"
NEURONS_PER_PRODUCT = 64  # neurons per unembedding product: bounds the [neurons, vocab] float32 block
NORM_TREATMENT = ("read straight through to the unembedding: each norm on the way (the block's output norm where the "
                  "family has one, then the final norm) applied as norm(w) - norm(0), i.e. its weight applied, a "
                  "LayerNorm's centring kept, no bias; the norm's 1/rms scale is one positive number per neuron, so it "
                  "changes no token's rank; the rest of the residual is left out. Logits are per unit-rms write, "
                  "for a positive activation: a neuron that is negative on the positive prompts (see its means) "
                  "pushes its suppressed tokens up there.")
PROMPT_CHARACTERS = 90


@dataclass
class NeuronCard:
    layer: int
    index: int
    rank: int | None  # among the eligible neurons by the recipe's ranking; None: not eligible (e.g. universal)
    score: float | None
    delta: float
    positive_mean: float
    negative_mean: float
    selection_frequency: float | None
    promoted: list[tuple[str, float]]  # (token text, logit per unit-rms write), best first
    suppressed: list[tuple[str, float]]  # most negative first
    most_active: list[dict] = field(default_factory=list)  # {"set": "positive"|"negative", "value", "prompt"}
    least_active: list[dict] = field(default_factory=list)
    effect_patched: float | None = None  # first-order change in M, patched to the negative-set mean
    effect_ablated: float | None = None  # first-order change in M, ablated (m = 0)

    @property
    def name(self) -> str:
        return f"L{self.layer}/N{self.index}"

    def table_row(self) -> dict:
        """A flat row (the W&B table's): lists joined into text."""
        return {"neuron": self.name, "layer": self.layer, "index": self.index, "rank": self.rank,
                "score": self.score, "delta": self.delta, "positive_mean": self.positive_mean,
                "negative_mean": self.negative_mean, "selection_frequency": self.selection_frequency,
                "promoted": token_list(self.promoted), "suppressed": token_list(self.suppressed),
                "most_active": prompt_list(self.most_active), "least_active": prompt_list(self.least_active),
                "effect_patched": self.effect_patched, "effect_ablated": self.effect_ablated}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def token_effects(adapter: ArchitectureAdapter, tokenizer, keys: Sequence[tuple[int, int]],
                  top: int = 10) -> dict[tuple[int, int], tuple[list, list]]:
    """(layer, index) -> (promoted, suppressed): the `top` tokens each neuron's output weight raises and lowers."""
    effects: dict[tuple[int, int], tuple[list, list]] = {}
    by_layer: dict[int, list[int]] = {}
    for layer, index in keys:
        by_layer.setdefault(layer, []).append(index)
    for layer, indices in sorted(by_layer.items()):
        for start in range(0, len(indices), NEURONS_PER_PRODUCT):
            chunk = indices[start:start + NEURONS_PER_PRODUCT]
            logits = adapter.neuron_logits(layer, torch.tensor(chunk))
            count = min(top, logits.shape[1])
            high, low = logits.topk(count, dim=1), logits.topk(count, dim=1, largest=False)
            for row, index in enumerate(chunk):
                effects[(layer, index)] = (_tokens(tokenizer, high.indices[row], high.values[row]),
                                           _tokens(tokenizer, low.indices[row], low.values[row]))
    return effects


def _tokens(tokenizer, ids: torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
    return [(token_text(tokenizer, int(t)), float(v)) for t, v in zip(ids, values, strict=True)]


def prompt_extremes(values: PromptValues, flat: int, positive: Sequence[str], negative: Sequence[str],
                    count: int = 3) -> tuple[list[dict], list[dict]]:
    """The discovery prompts on which the neuron is most and least active."""
    column = values.column(flat)
    entries = ([("positive", float(v), p) for v, p in zip(values.positive[:, column], positive, strict=True)]
               + [("negative", float(v), p) for v, p in zip(values.negative[:, column], negative, strict=True)])
    ordered = sorted(entries, key=lambda entry: -entry[1])
    rows = [{"set": side, "value": value, "prompt": prompt} for side, value, prompt in ordered]
    return rows[:count], rows[::-1][:count]


def neuron_cards(adapter: ArchitectureAdapter, tokenizer, circuit: Circuit, values: PromptValues, *,
                 positive: Sequence[str], negative: Sequence[str], ranks: dict[tuple[int, int], int],
                 gradients: GradientStatistics | None = None, negative_mean: torch.Tensor | None = None,
                 tokens: int = 10, prompts: int = 3) -> list[NeuronCard]:
    """One card per circuit neuron, in circuit order. `values` must hold every circuit neuron; `gradients` (the
    positive set's, with the full negative means [layers, neurons]) give the effect estimates."""
    require_dense(circuit, "neuron cards")
    width = circuit.neurons_per_layer
    effects = token_effects(adapter, tokenizer, [n.key for n in circuit.neurons], tokens)
    cards = []
    for neuron in circuit.neurons:
        most, least = prompt_extremes(values, neuron.layer * width + neuron.index, positive, negative, prompts)
        patched = ablated = None
        if gradients is not None:
            n = gradients.n_prompts
            activation_gradient = float(gradients.activation_gradient_sum[neuron.key]) / n
            gradient = float(gradients.gradient_sum[neuron.key]) / n
            ablated = -activation_gradient
            patched = -(activation_gradient - float(negative_mean[neuron.key]) * gradient)
        promoted, suppressed = effects[neuron.key]
        cards.append(NeuronCard(neuron.layer, neuron.index, ranks.get(neuron.key), neuron.score, neuron.delta,
                                neuron.positive_mean, neuron.negative_mean, neuron.selection_frequency, promoted,
                                suppressed, most, least, patched, ablated))
    return cards


def eligible_ranks(ranking: torch.Tensor, width: int, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """1-based positions of `keys` in `ranking` (flat ids, best first, as `eligible_ranking` gives them)."""
    position = {int(flat): i + 1 for i, flat in enumerate(ranking.tolist())}
    return {key: position[key[0] * width + key[1]] for key in keys if key[0] * width + key[1] in position}


# --- the page ---------------------------------------------------------------------------------------------------

def _code(text: str) -> str:
    """Token text as inline code, escapes made visible (a table cell escapes its pipes: `_cell`)."""
    shown = json.dumps(text, ensure_ascii=False)[1:-1].replace("`", "'")
    if not shown.strip():
        shown = shown.replace(" ", "␣") or "(empty)"  # an all-space token would render as nothing
    return f"`{shown}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def token_list(tokens: list[tuple[str, float]], values: bool = False) -> str:
    return ", ".join(_code(text) + (f" ({value:+.2f})" if values else "") for text, value in tokens)


def prompt_list(rows: list[dict]) -> str:
    return " / ".join(f"[{row['set'][:3]} {row['value']:+.3g}] {_short(row['prompt'])}" for row in rows)


def _short(prompt: str) -> str:
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= PROMPT_CHARACTERS else prompt[:PROMPT_CHARACTERS - 3] + "..."


def _number(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def render_card(card: NeuronCard, metric: str | None) -> list[str]:
    frequency = "not measured" if card.selection_frequency is None else f"{card.selection_frequency:.2f}"
    lines = [f"### {card.name} (rank {_number(card.rank, 'd')})", "",
             "| field | value |", "|---|---|",
             f"| score | {_number(card.score)} |",
             f"| delta (positive mean - negative mean) | {_number(card.delta)} ({_number(card.positive_mean)} - "
             f"{_number(card.negative_mean)}) |",
             f"| selection frequency | {frequency} |",
             f"| promotes | {_cell(token_list(card.promoted, values=True))} |",
             f"| suppresses | {_cell(token_list(card.suppressed, values=True))} |"]
    if metric is not None:
        lines.append(f"| effect on M, patched to the negative mean / ablated | {_number(card.effect_patched, '+.4g')}"
                     f" / {_number(card.effect_ablated, '+.4g')} |")
    lines += ["", "Most active on:"]
    lines += [f"- ({row['set']}, {row['value']:+.3g}) {_short(row['prompt'])}" for row in card.most_active]
    lines += ["", "Least active on:"]
    lines += [f"- ({row['set']}, {row['value']:+.3g}) {_short(row['prompt'])}" for row in card.least_active]
    return lines + [""]


def render_page(cards: list[NeuronCard], header: dict) -> str:
    """neurons.md: the circuit's settings, its stability where measured, and one card per neuron."""
    circuit_line = (f"{header.get('model', '?')}, method {header.get('method', '?')}, ranked by "
                    f"{header.get('score', '?')} (sign {header.get('sign', '?')}), {len(cards)} neurons")
    lines = ["# Neuron cards", "", circuit_line, ""]
    stability = header.get("stability") or {}
    if stability:
        lines += [stability_sentence(stability), ""]
    lines += [f"Promoted and suppressed tokens: the neuron's output weight {NORM_TREATMENT}", ""]
    metric = header.get("metric")
    if metric:
        lines += [f"Effect on M ({metric}), to first order from its gradient on the positive prompts: patched to the "
                  "negative-set mean, -(mean of (a - negative mean) x dM/da); ablated (m = 0), -(mean of a x dM/da).",
                  ""]
    else:
        lines += ["Effect on the behaviour: not estimated (no gradient of a behaviour metric in this job; "
                  "method.cards.effect=attribution computes one).", ""]
    for card in cards:
        lines += render_card(card, metric)
    return "\n".join(lines)


def stability_sentence(stability: dict) -> str:
    return (f"Stability: {stability['resamples']} resamples of {stability['fraction']:.0%} of each discovery set "
            f"({stability['positive_per_resample']} + {stability['negative_per_resample']} prompts): Jaccard of "
            f"resampled circuits {_number(stability['jaccard_mean'], '.3f')} (sd "
            f"{_number(stability['jaccard_sd'], '.3f')}, {_number(stability['jaccard_min'], '.3f')}-"
            f"{_number(stability['jaccard_max'], '.3f')}); the two disjoint halves "
            f"{_number(stability['halves_jaccard'], '.3f')}; stable core (chosen in >= "
            f"{stability['core_threshold']:.0%}) {stability['core_size']} of {stability['k']}; deepest rank reached "
            f"{stability['deepest_rank']} of {stability['candidates']} candidates.")


def write_cards(run_dir: str | Path, cards: list[NeuronCard], header: dict) -> dict[str, Path]:
    """neurons.json (the header and every card) and neurons.md, written atomically."""
    run_dir = Path(run_dir)
    data = {**header, "norm_treatment": NORM_TREATMENT, "cards": [asdict(card) for card in cards]}
    return {"json": write_json_atomic(run_dir / CARDS_JSON, data),
            "markdown": write_text_atomic(run_dir / CARDS_MD, render_page(cards, header))}


def read_cards(run_dir: str | Path) -> tuple[dict, list[NeuronCard]] | None:
    """(header, cards) from a run folder's neurons.json, or None where there is none."""
    path = Path(run_dir) / CARDS_JSON
    if not path.is_file():
        return None
    data = read_json(path)
    cards = [NeuronCard(**{**card, "promoted": [tuple(t) for t in card["promoted"]],
                           "suppressed": [tuple(t) for t in card["suppressed"]]}) for card in data.pop("cards")]
    return data, cards
