"""Circuit stability (beyond the paper): would other discovery prompts have given other neurons?

Discovery is repeated on resampled discovery sets: `resamples` draws of a `fraction` of the positive and of the
negative prompts (without replacement), and the two disjoint halves of each set. No resample runs the model: the
per-prompt values of a pool of candidate neurons (the full sets' top `candidates` by the recipe's ranking, universal
neurons already left out) are recorded in one pass (`record_prompt_values`, `collect_prompt_gradients`), and every
score is a mean over prompts of per-prompt quantities, so a subset's score is exact from them:

- delta: mean of a_ij over the chosen positives minus over the chosen negatives;
- projection: that delta x <w_j, r>, with r the unit residual mean difference recomputed from the chosen prompts'
  residuals at the direction layer (recorded in the same pass);
- attribution: (sum of a_ij dM_i/da_ij - negative mean of a_j x sum of dM_i/da_ij) / n over the chosen positives;
- target: the mean of a_ij dM_i/da_ij over the chosen positives.

Two things are held fixed. The universal filter is measured on the packaged diverse prompts, not on the discovery
sets, so resampling the discovery sets leaves it as it is. And a neuron outside the candidate pool cannot enter a
resampled circuit: `deepest_rank` says how far down the pool any resampled circuit reached (well short of the pool's
size: the cut decided nothing).

Each circuit neuron's *selection frequency* is the share of resamples whose circuit holds it; the *stable core* is
the circuit neurons chosen in at least `core_threshold` of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import pstdev
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cna.attribution import collect_prompt_gradients
from cna.batching import last_token_index, length_sorted_batches, pad_batch, position_ids
from cna.cache import statistics_key
from cna.circuit import Circuit
from cna.discovery import (
    DISCOVERY_TOKEN_BUDGET,
    NeuronScores,
    columns_by_layer,
    eligible_ranking,
    signed_score,
    token_values,
)
from cna.errors import CnaError, ConfigError
from cna.hooks import attached, read_input, read_output
from cna.models import ArchitectureAdapter

if TYPE_CHECKING:
    from cna.methods.base import DiscoverySets, Statistics

# What a job steers: the circuit; its stable core; as many neurons as the core drawn from the rest (all of the rest
# where it is smaller); or as many core neurons as `rest` steers, drawn from the core (equal sizes either way).
SUBSETS = ("full", "core", "rest", "core_matched")
# The default pool: the full sets' best max(4096, 4k) eligible neurons. Fixed below k = 1024, so a sweep over k shares
# one recorded pool (the neuron cards read theirs from it too).
MIN_CANDIDATES, CANDIDATES_PER_K = 4096, 4


@dataclass
class PromptValues:
    """Per-prompt values of some neurons (flat ids, layer x width + index) on the two discovery sets."""

    neurons: torch.Tensor  # [C] int64
    positive: torch.Tensor  # [positives, C] float32 activations
    negative: torch.Tensor  # [negatives, C]
    positive_activation_gradient: torch.Tensor | None = None  # [positives, C] float64: a x dM/da (gradient scores)
    positive_gradient: torch.Tensor | None = None  # [positives, C] float64: dM/da
    positive_residual: torch.Tensor | None = None  # [positives, hidden] at the direction layer (projection)
    negative_residual: torch.Tensor | None = None

    def column(self, flat: int) -> int:
        return int((self.neurons == flat).nonzero()[0, 0])

    def covers(self, flats: Sequence[int]) -> bool:
        return set(flats) <= set(self.neurons.tolist())

    def save(self, path: str | Path) -> Path:
        tensors = {name: value.contiguous() for name, value in vars(self).items() if value is not None}
        save_file(tensors, str(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> PromptValues:
        return cls(**load_file(str(path)))


def record_prompt_values(
    adapter: ArchitectureAdapter,
    prompts: Sequence[Sequence[int]],
    neurons: torch.Tensor,
    *,
    pad_token_id: int,
    position: str = "last",
    residual_layer: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "per-prompt values",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values of `neurons` (flat ids) on each prompt, [prompts, neurons] float32, read as `collect_statistics`
    reads them (same batches, same token position); with `residual_layer`, also that layer's output [prompts,
    hidden]."""
    if not prompts:
        raise ConfigError(f"{desc}: the prompt set is empty")
    columns = columns_by_layer(neurons, adapter.neurons_per_layer)
    values = torch.zeros(len(prompts), len(neurons))
    residuals = None if residual_layer is None else torch.zeros(len(prompts), adapter.hidden_size)
    batch: dict[str, torch.Tensor] = {}

    def neuron_reader(column: torch.Tensor, index: torch.Tensor):
        def read(hidden: torch.Tensor) -> None:
            chosen = token_values(hidden[..., index.to(hidden.device)], position, batch["last"], batch["mask"])
            values[batch["rows"].unsqueeze(1), column] = chosen.cpu()

        return read

    def residual_reader(hidden: torch.Tensor) -> None:
        residuals[batch["rows"]] = token_values(hidden, position, batch["last"], batch["mask"]).cpu()

    hooks = [read_input(adapter.neuron_sites[layer], neuron_reader(column, index))
             for layer, (column, index) in columns.items()]
    if residual_layer is not None:
        hooks.append(read_output(adapter.layers[residual_layer], residual_reader))
    device = adapter.input_device
    with attached(hooks), torch.inference_mode():
        for rows in tqdm(list(length_sorted_batches(prompts, batch_size, max_batch_tokens)), desc=desc,
                         unit="batch", disable=not progress, leave=False):
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, "left")
            batch.update(rows=torch.tensor(list(rows)), mask=mask, last=last_token_index(mask))
            adapter.body(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids(mask).to(device), use_cache=False)
    return values, residuals


def candidate_neurons(scores: NeuronScores, *, k: int, sign: str, layers: tuple[int, int] | None = None,
                      universal: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """The pool resampling chooses from: the full sets' best `count` eligible neurons (default max(4096, 4k)),
    flat ids in ranking order."""
    ranked = eligible_ranking(scores.ranking, sign, layers, universal)
    count = max(MIN_CANDIDATES, CANDIDATES_PER_K * k) if count is None else count
    if count < k:
        raise ConfigError(f"method.stability.candidates: expected at least k = {k}, got {count}")
    return ranked[:count]


def output_weights(adapter: ArchitectureAdapter, neurons: torch.Tensor) -> torch.Tensor:
    """[neurons, hidden] float64: what each neuron (flat id) writes, for projection resampling."""
    width = adapter.neurons_per_layer
    rows = torch.zeros(len(neurons), adapter.hidden_size, dtype=torch.float64)
    for layer, (column, index) in columns_by_layer(neurons, width).items():
        weights = adapter.neuron_weights(layer).detach()
        rows[column] = weights[index.to(weights.device)].double().cpu()
    return rows


def prompt_values_key(positive_key: str, negative_key: str, neurons: torch.Tensor, *, score: dict | None,
                      residual_layer: int | None) -> str:
    """The statistics cache key of a PromptValues: both sets' statistics keys, the neurons, the gradient metric."""
    fields = {"positive": positive_key, "negative": negative_key, "score": score, "residual_layer": residual_layer,
              "neurons": hashlib.sha256(json.dumps(neurons.tolist()).encode()).hexdigest()}
    return "values-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def prompt_values(statistics: Statistics, sets: DiscoverySets, neurons: torch.Tensor, *, position: str = "last",
                  metric: Callable | None = None, metric_id: dict | None = None,
                  residual_layer: int | None = None) -> PromptValues:
    """Per-prompt values of `neurons` on both discovery sets, with the positive set's gradients of a gradient score's
    `metric` and the residuals at `residual_layer`: one pass, cached with the job's discovery statistics."""
    positive, negative = statistics.encode(sets.positive), statistics.encode(sets.negative)
    keys = (statistics_key(model=statistics.identity, site=statistics.site, prompts=encoded, position=position,
                           top_fraction=None) for encoded in (positive, negative))
    key = prompt_values_key(*keys, neurons, score=metric_id, residual_layer=residual_layer)
    common = dict(pad_token_id=statistics.tokenizer.pad_token_id, batch_size=statistics.batch_size,
                  max_batch_tokens=statistics.max_batch_tokens, progress=statistics.progress)

    def record() -> PromptValues:
        read = dict(position=position, residual_layer=residual_layer, **common)
        positive_values, positive_residual = record_prompt_values(statistics.adapter, positive, neurons,
                                                                  desc="positive per prompt", **read)
        negative_values, negative_residual = record_prompt_values(statistics.adapter, negative, neurons,
                                                                  desc="negative per prompt", **read)
        activation_gradient = gradient = None
        if metric is not None:
            activation_gradient, gradient = collect_prompt_gradients(
                statistics.adapter, positive, metric, neurons, desc=f"{metric_id.get('score', 'gradients')} per prompt",
                **common)
        return PromptValues(neurons, positive_values, negative_values, activation_gradient, gradient,
                            positive_residual, negative_residual)

    return statistics.cache.get_or_compute(key, record, load=PromptValues.load)


def resampled_scores(values: PromptValues, score: str, positive_rows: torch.Tensor, negative_rows: torch.Tensor,
                     writes: torch.Tensor | None = None) -> torch.Tensor:
    """[C] float64: the `score` of every recorded neuron from the chosen prompts only (exact; module docstring).

    `writes` [C, hidden] are the neurons' output weights, for projection.
    """
    negative_mean = values.negative[negative_rows].double().mean(0)
    if score in ("delta", "projection"):
        delta = values.positive[positive_rows].double().mean(0) - negative_mean
        if score == "delta":
            return delta
        if writes is None or values.positive_residual is None:
            raise CnaError("projection resampling needs the residuals and the neurons' output weights")
        direction = (values.positive_residual[positive_rows].double().mean(0)
                     - values.negative_residual[negative_rows].double().mean(0))
        return delta * (writes.double() @ (direction / direction.norm()))
    if values.positive_activation_gradient is None:
        raise CnaError(f"{score} resampling needs the per-prompt gradients (collect_prompt_gradients)")
    activation_gradient = values.positive_activation_gradient[positive_rows].sum(0)
    if score == "target":
        return activation_gradient / len(positive_rows)
    return (activation_gradient - negative_mean * values.positive_gradient[positive_rows].sum(0)) / len(positive_rows)


def top_columns(neurons: torch.Tensor, score: torch.Tensor, sign: str, k: int) -> torch.Tensor:
    """Columns of the best k by `score` under `sign`, ties broken by flat id as `rank_neurons` breaks them."""
    by_id = torch.argsort(neurons)
    order = torch.sort(signed_score(score[by_id], sign), descending=True, stable=True).indices
    return by_id[order[:k]]


@dataclass
class Stability:
    """The outcome of resampled discovery for one circuit."""

    circuit: list[tuple[int, int]]  # the full sets' circuit, best first
    membership: torch.Tensor  # [resamples, C] bool: which candidates each resample chose
    candidates: torch.Tensor  # [C] flat ids in the full sets' ranking order
    width: int
    fraction: float
    sizes: tuple[int, int]  # positives, negatives per resample
    halves: tuple[set, set]  # the circuits of the two disjoint halves
    reproduced: bool  # the full sets' selection from the recorded values is the circuit itself
    core_threshold: float = 0.8
    seed: int = 0

    def _key(self, column: int) -> tuple[int, int]:
        flat = int(self.candidates[column])
        return flat // self.width, flat % self.width

    @property
    def frequency(self) -> dict[tuple[int, int], float]:
        """Every neuron some resample chose, with the share of resamples that chose it."""
        shares = self.membership.double().mean(0)
        return {self._key(column): float(shares[column]) for column in shares.nonzero().flatten().tolist()}

    @property
    def core(self) -> list[tuple[int, int]]:
        frequency = self.frequency
        return [key for key in self.circuit if frequency.get(key, 0.0) >= self.core_threshold]

    @property
    def rest(self) -> list[tuple[int, int]]:
        core = set(self.core)
        return [key for key in self.circuit if key not in core]

    def jaccard(self) -> list[float]:
        """Jaccard index of every pair of resampled circuits."""
        chosen = self.membership.double()
        shared = chosen @ chosen.t()
        sizes = chosen.sum(1)
        union = sizes.unsqueeze(0) + sizes.unsqueeze(1) - shared
        pairs = torch.triu_indices(len(chosen), len(chosen), offset=1)
        return (shared[pairs[0], pairs[1]] / union[pairs[0], pairs[1]]).tolist()

    def jaccard_to_full(self) -> list[float]:
        full = set(self.circuit)
        return [_jaccard(full, {self._key(c) for c in row.nonzero().flatten().tolist()}) for row in self.membership]

    @property
    def deepest_rank(self) -> int:
        """The lowest full-set rank (1 = best) any resampled circuit reached, of the pool's `len(candidates)`."""
        used = self.membership.any(0).nonzero().flatten()
        return int(used.max()) + 1 if len(used) else 0

    def summary(self) -> dict:
        """circuit.json's `stability` entry."""
        pairs, to_full = self.jaccard(), self.jaccard_to_full()
        core, circuit = self.core, set(self.circuit)
        outside = sum(share >= self.core_threshold for key, share in self.frequency.items() if key not in circuit)
        return {
            "resamples": len(self.membership), "fraction": self.fraction,
            "positive_per_resample": self.sizes[0], "negative_per_resample": self.sizes[1],
            "jaccard_mean": _mean(pairs), "jaccard_sd": pstdev(pairs) if len(pairs) > 1 else 0.0,
            "jaccard_min": min(pairs, default=None), "jaccard_max": max(pairs, default=None),
            "jaccard_to_full_mean": _mean(to_full),
            "halves_jaccard": _jaccard(*self.halves),
            "halves_jaccard_to_full": [_jaccard(set(self.circuit), half) for half in self.halves],
            "core_threshold": self.core_threshold, "k": len(self.circuit), "core_size": len(core),
            "core": [list(key) for key in core], "stable_outside_circuit": int(outside),
            "candidates": len(self.candidates), "deepest_rank": self.deepest_rank,
            "reproduced": self.reproduced, "seed": self.seed,
        }


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def require_dense(circuit: Circuit, what: str) -> None:
    """Stability and neuron cards key neurons by (layer, index); an expert's neuron (layer, expert, index) is not."""
    if any(neuron.expert is not None for neuron in circuit.neurons):
        raise CnaError(f"{what}: {circuit.model}'s circuit has neurons of a mixture of experts' experts; "
                       "only dense models' circuits are supported")


def measure_stability(values: PromptValues, circuit: Circuit, *, score: str, sign: str, resamples: int,
                      fraction: float, seed: int = 0, core_threshold: float = 0.8,
                      writes: torch.Tensor | None = None) -> Stability:
    """Repeat the selection of `circuit` (its k, `score`, `sign`) on `resamples` subsets of `fraction` of each set
    and on the two disjoint halves. `values` holds the candidate pool in ranking order (`candidate_neurons`)."""
    if resamples < 1:
        raise ConfigError(f"method.stability.resamples: expected at least 1, got {resamples}")
    require_dense(circuit, "circuit stability")
    if not 0 < fraction <= 1:
        raise ConfigError(f"method.stability.fraction: expected a number in (0, 1], got {fraction}")
    width, k = circuit.neurons_per_layer, circuit.k
    n_positive, n_negative = len(values.positive), len(values.negative)
    if n_positive < 2 or n_negative < 2:
        raise ConfigError("method.stability: resampling needs at least 2 prompts in each discovery set")
    generator = torch.Generator().manual_seed(seed)
    sizes = (max(1, round(fraction * n_positive)), max(1, round(fraction * n_negative)))

    def chosen(positive_rows: torch.Tensor, negative_rows: torch.Tensor) -> torch.Tensor:
        return top_columns(values.neurons, resampled_scores(values, score, positive_rows, negative_rows, writes),
                           sign, k)

    def keys(columns: torch.Tensor) -> set[tuple[int, int]]:
        return {(int(values.neurons[c]) // width, int(values.neurons[c]) % width) for c in columns}

    full = keys(chosen(torch.arange(n_positive), torch.arange(n_negative)))
    membership = torch.zeros(resamples, len(values.neurons), dtype=torch.bool)
    for row in range(resamples):
        positive_rows = torch.randperm(n_positive, generator=generator)[:sizes[0]]
        negative_rows = torch.randperm(n_negative, generator=generator)[:sizes[1]]
        membership[row, chosen(positive_rows, negative_rows)] = True
    positive_order = torch.randperm(n_positive, generator=generator)
    negative_order = torch.randperm(n_negative, generator=generator)
    halves = tuple(keys(chosen(positive_order[part], negative_order[part_negative]))
                   for part, part_negative in ((slice(0, n_positive // 2), slice(0, n_negative // 2)),
                                               (slice(n_positive // 2, None), slice(n_negative // 2, None))))
    return Stability(circuit=[n.key for n in circuit.neurons], membership=membership, candidates=values.neurons,
                     width=width, fraction=fraction, sizes=sizes, halves=halves,
                     reproduced=full == {n.key for n in circuit.neurons}, core_threshold=core_threshold, seed=seed)


def with_frequencies(circuit: Circuit, stability: Stability) -> Circuit:
    """The circuit with each neuron's selection frequency and the summary in `stability`."""
    frequency = stability.frequency
    neurons = [replace(n, selection_frequency=frequency.get(n.key, 0.0)) for n in circuit.neurons]
    return replace(circuit, neurons=neurons, stability=stability.summary())


def subset_circuit(circuit: Circuit, stability: Stability, subset: str, seed: int = 0) -> Circuit:
    """`full`: the circuit; `core`: its stable core; `rest`: as many neurons as the core, drawn (seeded) from the
    circuit's other neurons (all of them where there are fewer); `core_matched`: as many core neurons, drawn
    (seeded), as `rest` steers, so a core and a rest of equal size compare where the rest is the smaller."""
    if subset not in SUBSETS:
        raise ConfigError(f"method.stability.steer: expected one of {', '.join(SUBSETS)}, got {subset!r}")
    if subset == "full":
        return circuit
    core = stability.core
    if not core:
        raise CnaError(f"method.stability.steer={subset}: the stable core is empty (no circuit neuron was chosen in "
                       f"{stability.core_threshold:.0%} of the resamples)")
    rest = stability.rest
    if subset == "core":
        chosen = set(core)
    else:
        if not rest:
            raise CnaError(f"method.stability.steer={subset}: every circuit neuron is in the stable core")
        source = rest if subset == "rest" else core
        drawn = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
        chosen = {source[i] for i in drawn[:min(len(core), len(rest))].tolist()}
    neurons = [n for n in circuit.neurons if n.key in chosen]
    total = circuit.n_layers * circuit.neurons_per_layer
    drawn_settings = {"subset_seed": seed, "core_size": len(core), "rest_size": len(rest)} if subset != "core" else {}
    return replace(circuit, neurons=neurons, k_fraction=len(neurons) / total,
                   settings={**circuit.settings, "stability_subset": subset, "subset_of_k": circuit.k,
                             **drawn_settings})
