"""Contrastive neuron discovery (paper sections 3.1-3.2).

1. `collect_statistics`: forward passes only, batched; at the last real token of
   every prompt, each MLP neuron's value and the residual stream after each layer
   are added to running float64 sums. Memory is O(layers x neurons).
2. `contrastive_scores`: delta = mean over positives - mean over negatives.
3. `universal_neurons`: neurons in their prompt's top fraction of |activation|
   for at least `threshold` of a diverse prompt set; they carry no behaviour.
4. `select_circuit`: the top k by |delta| (or signed), universal neurons skipped
   and the circuit refilled so k stays k.

In mixture-of-experts layers a neuron is (expert, j) and its value at a token is what
the expert computed there if the router chose it, 0 otherwise (`cna.experts`); the
statistics also count how often each expert was chosen at the prompts' position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cna.batching import last_token_index, length_sorted_batches, pad_batch, position_ids
from cna.circuit import Circuit, Neuron, ResidualDirection
from cna.errors import ConfigError
from cna.experts import ExpertReadout, NeuronLayout
from cna.hooks import attached, read_input, read_output
from cna.models import ArchitectureAdapter

POSITIONS = ("last", "mean")  # the token(s) whose activation stands for a prompt
SIGNS = ("abs", "positive", "negative")
# Padded tokens per discovery batch: activation memory grows with batch x length (the MLP
# intermediates alone are 4 x tokens x neurons floats), so a budget bounds it (see BENCHMARKS.md).
DISCOVERY_TOKEN_BUDGET = 256


@dataclass
class ActivationStatistics:
    """Running sums over one prompt set; means are sums / n_prompts."""

    n_prompts: int
    neuron_sum: torch.Tensor  # [layers, neurons] float64
    residual_sum: torch.Tensor  # [layers, hidden] float64
    position: str
    top_fraction: float | None = None
    top_counts: torch.Tensor | None = None  # [layers, neurons]: prompts where the neuron was in the top fraction
    layout: NeuronLayout | None = None  # mixtures of experts: where each expert's neurons sit on a layer's axis
    routing_sum: torch.Tensor | None = None  # [layers, routed experts]: how often each was chosen (at the position)

    @property
    def neuron_mean(self) -> torch.Tensor:
        return self.neuron_sum / self.n_prompts

    @property
    def residual_mean(self) -> torch.Tensor:
        return self.residual_sum / self.n_prompts

    @property
    def routing_frequency(self) -> torch.Tensor | None:
        """[layers, routed experts]: the fraction of prompts whose position the router sent to each expert (with
        position mean: the mean fraction of a prompt's tokens)."""
        return None if self.routing_sum is None else self.routing_sum / self.n_prompts

    def save(self, path: str | Path) -> Path:
        tensors = {"neuron_sum": self.neuron_sum, "residual_sum": self.residual_sum}
        if self.top_counts is not None:
            tensors["top_counts"] = self.top_counts
        metadata = {"n_prompts": str(self.n_prompts), "position": self.position, "top_fraction": str(self.top_fraction)}
        if self.layout is not None:
            tensors["routing_sum"] = self.routing_sum
            metadata["layout"] = json.dumps(self.layout.to_dict())
        save_file(tensors, str(path), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ActivationStatistics:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        top_fraction = None if metadata["top_fraction"] == "None" else float(metadata["top_fraction"])
        return cls(
            n_prompts=int(metadata["n_prompts"]),
            neuron_sum=tensors["neuron_sum"],
            residual_sum=tensors["residual_sum"],
            position=metadata["position"],
            top_fraction=top_fraction,
            top_counts=tensors.get("top_counts"),
            layout=NeuronLayout.from_dict(json.loads(metadata["layout"])) if "layout" in metadata else None,
            routing_sum=tensors.get("routing_sum"),
        )


def token_values(hidden: torch.Tensor, position: str, last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, H] float32: the value that stands for each prompt (its `last` real token, or the mean).

    The mean is taken in float32 (a bfloat16 sum over hundreds of tokens is off by up to 1%)
    and padded positions are selected away, not multiplied by 0: a fully masked padding row
    can hold NaN, and NaN * 0 is NaN.
    """
    if position == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last.to(hidden.device)].float()
    real = mask.to(hidden.device, torch.bool).unsqueeze(-1)
    return torch.where(real, hidden.float(), 0.0).sum(1) / real.sum(1)


def collect_statistics(
    adapter: ArchitectureAdapter,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET,
    position: str = "last",
    top_fraction: float | None = None,
    padding_side: str = "left",
    progress: bool = True,
    desc: str = "discovery",
) -> ActivationStatistics:
    """Stream per-neuron and per-layer residual sums over `prompts` (token id lists).

    With `top_fraction`, also count for each neuron the prompts in which its
    |activation| is among the top `top_fraction` of all the model's MLP neurons
    (routed and shared experts' neurons included; a padded layer's padding never is).
    """
    if not prompts:
        raise ConfigError(f"{desc}: the prompt set is empty")
    if position not in POSITIONS:
        raise ConfigError(f"position '{position}' is not one of {POSITIONS}")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ConfigError(f"top_fraction must be in (0, 1], got {top_fraction}")
    n_layers, width = adapter.n_layers, adapter.neurons_per_layer
    device = adapter.input_device
    neuron_sum = torch.zeros(n_layers, width, dtype=torch.float64, device=device)
    residual_sum = torch.zeros(n_layers, adapter.hidden_size, dtype=torch.float64, device=device)
    top_counts = torch.zeros(n_layers * width, dtype=torch.int64, device=device) if top_fraction else None
    top_k = max(1, round(top_fraction * adapter.total_neurons)) if top_fraction else 0
    layout = adapter.layout
    routing_sum = torch.zeros(n_layers, layout.n_routed, dtype=torch.float64, device=device) if layout else None
    padding = (~layout.valid()).flatten().to(device) if layout is not None and layout.padded else None

    batch: dict[str, torch.Tensor] = {}
    # Top counting ranks every neuron of a prompt at once, so it needs the batch's values from all layers:
    # one buffer, allocated once. Plain statistics keep nothing between hooks: tensors held across the
    # forward's own allocations raised peak RSS by half, most likely by fragmenting the C heap (BENCHMARKS.md).
    neuron_values = torch.empty(batch_size, n_layers, width, device=device) if top_counts is not None else None

    def prompt_values(hidden: torch.Tensor) -> torch.Tensor:
        return token_values(hidden, position, batch["last"], batch["mask"])

    def deliver(layer: int, values: torch.Tensor, chosen: torch.Tensor | None = None) -> None:
        """Add one batch's prompt values [B, the layer's width] (and its experts' choices [B, experts])."""
        values = values.to(device)
        neuron_sum[layer, : values.shape[-1]] += values.sum(0, dtype=torch.float64)
        if neuron_values is not None:
            neuron_values[: len(values), layer, : values.shape[-1]] = values
        if chosen is not None:
            routing_sum[layer, : chosen.shape[-1]] += chosen.to(device).sum(0, dtype=torch.float64)

    def neuron_reader(layer: int):
        def read(hidden: torch.Tensor) -> None:
            deliver(layer, prompt_values(hidden))

        return read

    def residual_reader(layer: int):
        def read(hidden: torch.Tensor) -> None:
            residual_sum[layer] += prompt_values(hidden).to(device).sum(0, dtype=torch.float64)

        return read

    hooks = [read_input(site, neuron_reader(i)) for i, site in enumerate(adapter.neuron_sites)
             if adapter.experts[i] is None]
    if adapter.has_experts:
        hooks += ExpertReadout(adapter.experts, batch, position, batch_size, prompt_values, deliver, device).hooks()
    hooks += [read_output(layer, residual_reader(i)) for i, layer in enumerate(adapter.layers)]
    batches = list(length_sorted_batches(prompts, batch_size, max_batch_tokens))
    with attached(hooks), torch.inference_mode():
        for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, padding_side)
            batch["mask"], batch["last"] = mask, last_token_index(mask)
            adapter.body(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids(mask).to(device),
                use_cache=False,
            )
            if neuron_values is not None:
                magnitudes = neuron_values[: len(rows)].abs().flatten(1)  # [B, layers * neurons]
                if padding is not None:
                    magnitudes.masked_fill_(padding, -1.0)
                top = magnitudes.topk(top_k, dim=1).indices.flatten()
                top_counts.index_add_(0, top, torch.ones_like(top))
    return ActivationStatistics(
        n_prompts=len(prompts),
        neuron_sum=neuron_sum.cpu(),
        residual_sum=residual_sum.cpu(),
        position=position,
        top_fraction=top_fraction,
        top_counts=None if top_counts is None else top_counts.view(n_layers, width).cpu(),
        layout=layout,
        routing_sum=None if routing_sum is None else routing_sum.cpu(),
    )


@dataclass
class NeuronScores:
    """Per-neuron contrastive scores, [layers, neurons] float64 each.

    Neurons are ranked by `delta` (the paper) or, when `value` is set, by the score `name` it holds
    (`cna.attribution`: projection, attribution, target); selection is the same either way.
    In mixtures of experts, column `flat` of a layer is the neuron `layout.locate(layer, flat)`.
    """

    delta: torch.Tensor
    positive_mean: torch.Tensor
    negative_mean: torch.Tensor
    name: str = "delta"
    value: torch.Tensor | None = None
    layout: NeuronLayout | None = None
    routing: dict[str, torch.Tensor] | None = None  # {"positive"|"negative": [layers, routed experts] frequencies}

    @property
    def ranking(self) -> torch.Tensor:
        return self.delta if self.value is None else self.value

    @property
    def total(self) -> int:
        """The neurons to choose from (a padded layer's padding is none)."""
        return self.layout.total if self.layout else self.delta.numel()

    def neuron(self, layer: int, index: int) -> Neuron:
        """The neuron at column `index` of `layer` (with its expert and its index inside the expert, in MoE layers)."""
        expert, within = (None, index) if self.layout is None else self.layout.locate(layer, index)
        return Neuron(
            layer=layer,
            index=within,
            delta=float(self.delta[layer, index]),
            positive_mean=float(self.positive_mean[layer, index]),
            negative_mean=float(self.negative_mean[layer, index]),
            score=float(self.ranking[layer, index]),
            expert=expert,
        )

    def experts_record(self) -> dict | None:
        """What circuit.json says of the experts: each layer's layout, and how often each routed expert was chosen
        on each set at the prompts' position (per MoE layer)."""
        if self.layout is None:
            return None
        moe = [layer for layer, spec in enumerate(self.layout.layers) if "experts" in spec]
        return {"layout": list(self.layout.layers),
                "routing_frequency": {side: {str(layer): [round(float(f), 6) for f in frequency[layer][
                    : self.layout.layers[layer]["experts"]]] for layer in moe}
                    for side, frequency in (self.routing or {}).items()}}


def contrastive_scores(positive: ActivationStatistics, negative: ActivationStatistics) -> NeuronScores:
    if positive.neuron_sum.shape != negative.neuron_sum.shape:
        raise ConfigError("positive and negative statistics come from different models")
    if positive.position != negative.position:
        raise ConfigError(f"positive statistics use position '{positive.position}', negative '{negative.position}'")
    if positive.layout != negative.layout:
        raise ConfigError("positive and negative statistics have different expert layouts")
    positive_mean, negative_mean = positive.neuron_mean, negative.neuron_mean
    routing = None if positive.layout is None else {"positive": positive.routing_frequency,
                                                    "negative": negative.routing_frequency}
    return NeuronScores(positive_mean - negative_mean, positive_mean, negative_mean, layout=positive.layout,
                        routing=routing)


def universal_neurons(diverse: ActivationStatistics, threshold: float = 0.8) -> torch.Tensor:
    """Bool [layers, neurons]: in the prompt's top fraction of |activation| for >= `threshold` of prompts."""
    if diverse.top_counts is None:
        raise ConfigError("the diverse-set statistics were collected without top_fraction")
    if not 0 < threshold <= 1:
        raise ConfigError(f"universal threshold must be in (0, 1], got {threshold}")
    return diverse.top_counts >= threshold * diverse.n_prompts


def resolve_k(total: int, k_fraction: float | None = None, k: int | None = None) -> int:
    """k from a fraction of all MLP neurons (rounded, at least 1) or an absolute count."""
    if (k_fraction is None) == (k is None):
        raise ConfigError("give exactly one of k_fraction and k")
    if k is not None:
        if not 1 <= k <= total:
            raise ConfigError(f"k must be in [1, {total}], got {k}")
        return int(k)
    if not 0 < k_fraction <= 1:
        raise ConfigError(f"k_fraction must be in (0, 1], got {k_fraction}")
    return max(1, round(k_fraction * total))


def signed_score(delta: torch.Tensor, sign: str) -> torch.Tensor:
    if sign not in SIGNS:
        raise ConfigError(f"sign '{sign}' is not one of {SIGNS}")
    return {"abs": delta.abs(), "positive": delta, "negative": -delta}[sign]


def rank_neurons(
    delta: torch.Tensor, sign: str = "abs", layers: tuple[int, int | None] | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat neuron ids (layer * neurons_per_layer + index), best first; ties by (layer, index).

    `layers` is [start, stop); stop None means through the last layer. `valid` (bool, like `delta`) leaves out the
    padding of layers narrower than the widest.
    """
    n_layers, width = delta.shape
    score = signed_score(delta, sign).flatten()
    candidates = torch.arange(score.numel())
    if layers is not None:
        start, stop = layers[0], n_layers if layers[1] is None else layers[1]
        if not 0 <= start < stop <= n_layers:
            raise ConfigError(f"layer range [{start}, {stop}) is not within [0, {n_layers})")
        candidates = candidates[start * width : stop * width]
    if valid is not None:
        candidates = candidates[valid.flatten()[candidates]]
    order = torch.sort(score[candidates], descending=True, stable=True).indices
    return candidates[order]


def eligible_ranking(ranking: torch.Tensor, sign: str = "abs", layers: tuple[int, int | None] | None = None,
                     universal: torch.Tensor | None = None) -> torch.Tensor:
    """Flat neuron ids best first, as `rank_neurons`, with the universal neurons left out: the order a circuit
    takes its k from."""
    ranked = rank_neurons(ranking, sign, layers)
    return ranked if universal is None else ranked[~universal.flatten()[ranked]]


def columns_by_layer(neurons: torch.Tensor, width: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (positions in `neurons`, neuron indices within the layer), for the layers the flat ids touch."""
    layer_of = neurons // width
    return {int(layer): ((layer_of == layer).nonzero().squeeze(1), neurons[layer_of == layer] % width)
            for layer in layer_of.unique()}


def select_circuit(
    scores: NeuronScores,
    *,
    model: str,
    k_fraction: float | None = 0.001,
    k: int | None = None,
    sign: str = "abs",
    layers: tuple[int, int] | None = None,
    universal: torch.Tensor | None = None,
    prompts: dict | None = None,
    settings: dict | None = None,
) -> Circuit:
    """The top-k neurons by `scores.ranking`; universal neurons are skipped and the circuit refilled.

    k is `k_fraction` of all MLP neurons (every routed and shared expert neuron counts), or `k` neurons when a
    count is given (it overrides the fraction).
    """
    n_layers, width = scores.ranking.shape
    if k is not None:
        n_selected = resolve_k(scores.total, k=k)
        k_fraction = n_selected / scores.total
    else:
        n_selected = resolve_k(scores.total, k_fraction=k_fraction)
    padded = scores.layout is not None and scores.layout.padded
    ranked = rank_neurons(scores.ranking, sign, layers, valid=scores.layout.valid() if padded else None)
    universal_removed = 0
    if universal is not None:
        flagged = universal.flatten()[ranked]
        universal_removed = int(flagged[:n_selected].sum())
        ranked = ranked[~flagged]
    chosen = ranked[:n_selected].tolist()
    neurons = [scores.neuron(flat // width, flat % width) for flat in chosen]
    return Circuit(
        model=model,
        method="cna",
        score=scores.name,
        neurons=neurons,
        n_layers=n_layers,
        neurons_per_layer=width,
        k_fraction=k_fraction,
        universal_removed=universal_removed,
        prompts=prompts or {},
        experts=scores.experts_record(),
        settings={
            "k_requested": k if k is not None else k_fraction,
            "sign": sign,
            "layers": list(layers) if layers else None,
            "universal_flagged": None if universal is None else int(universal.sum()),
            **(settings or {}),
        },
    )


def random_circuit(circuit: Circuit, scores: NeuronScores, seed: int) -> Circuit:
    """The control: as many neurons per layer as `circuit`, drawn uniformly from the neurons it does not use."""
    generator = torch.Generator().manual_seed(seed)
    used = {n.key for n in circuit.neurons}
    neurons = []
    for layer, count in sorted(circuit.layer_counts.items()):
        if count == 0:
            continue
        if scores.layout is None:
            free = torch.tensor([i for i in range(circuit.neurons_per_layer) if (layer, i) not in used])
        else:  # every expert's neurons in the layer, routed and shared
            taken = {scores.layout.flat(layer, n.expert, n.index) for n in circuit.neurons if n.layer == layer}
            free = torch.tensor([flat for flat in range(scores.layout.layer_width(layer)) if flat not in taken])
        drawn = free[torch.randperm(len(free), generator=generator)[:count]].sort().values
        neurons += [scores.neuron(layer, int(index)) for index in drawn]
    return replace(circuit, method="random", neurons=neurons, universal_removed=0,
                   settings={**circuit.settings, "seed": seed, "matched_to": circuit.method})


def residual_direction(
    positive: ActivationStatistics,
    negative: ActivationStatistics,
    *,
    model: str,
    method: str,
    source_layer: int,
    layers: list[int],
    prompts: dict | None = None,
    settings: dict | None = None,
) -> ResidualDirection:
    """The residual-stream mean difference (positive - negative) measured at `source_layer`'s output."""
    n_layers = positive.residual_sum.shape[0]
    if not 0 <= source_layer < n_layers:
        raise ConfigError(f"layer {source_layer} is not within [0, {n_layers})")
    difference = positive.residual_mean[source_layer] - negative.residual_mean[source_layer]
    return ResidualDirection(
        model=model,
        method=method,
        source_layer=source_layer,
        layers=layers,
        vector=difference.tolist(),
        n_layers=n_layers,
        prompts=prompts or {},
        settings=settings or {},
    )


def resolve_layer_range(layers: Sequence[int | float | None] | None, n_layers: int) -> tuple[int, int] | None:
    """[start, stop) layer indices from indices or fractions of depth; stop None means through the last layer.

    Fractions (numbers written with a decimal point, in [0, 1]) are widened to whole layers, so the range
    covers at least the fraction asked for: [0.9, 1.0] of 24 layers is layers 21-23 (the paper's "final ~10%").
    """
    if layers is None:
        return None
    start, stop = layers
    if isinstance(start, float) or isinstance(stop, float):
        stop = 1.0 if stop is None else stop
        start, stop = math.floor(start * n_layers), math.ceil(stop * n_layers)
    stop = n_layers if stop is None else stop
    if not 0 <= start < stop <= n_layers:
        raise ConfigError(f"method.layers: [{start}, {stop}) is not within [0, {n_layers}) for this model")
    return int(start), int(stop)


def layer_at_fraction(n_layers: int, fraction: float) -> int:
    """The decoder layer at a fraction of depth (0 = first, 1 = last)."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"layer fraction must be in [0, 1], got {fraction}")
    return min(n_layers - 1, int(fraction * n_layers))
