"""Circuits: the neurons a method selected, as a plain value that round-trips through `circuit.json`.

`Circuit` holds MLP neurons (CNA and the random control); `ResidualDirection`
is its residual-stream counterpart (CAA and directional ablation), written to
the same file with the layer(s) and vector norm instead of a neuron list;
`ExpertChoice` is the router baseline's (the experts whose gate logits it shifts).
In mixtures of experts a neuron also names its expert (`expert`; absent for dense layers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cna.io import read_json, write_json_atomic


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    delta: float  # mean over positive prompts - mean over negative prompts
    positive_mean: float
    negative_mean: float
    score: float | None = None  # the value it was ranked by (delta for the paper's score); None in older files
    expert: int | None = None  # mixtures of experts: routed 0..E-1, shared E..; None for a dense layer's neuron
    selection_frequency: float | None = None  # share of resampled discoveries choosing it (cna.stability)

    @property
    def key(self) -> tuple[int, ...]:
        """(layer, index), or (layer, expert, index) for an expert's neuron."""
        return (self.layer, self.index) if self.expert is None else (self.layer, self.expert, self.index)

    def to_dict(self) -> dict:
        """circuit.json's entry: `expert` only for an expert's neuron and `selection_frequency` only where stability
        was measured, so other files keep their old form."""
        fields = asdict(self)
        for optional in ("expert", "selection_frequency"):
            if fields[optional] is None:
                del fields[optional]
        return fields


@dataclass
class Circuit:
    model: str
    method: str
    neurons: list[Neuron]
    n_layers: int
    neurons_per_layer: int
    k_fraction: float = 0.0  # k as a fraction of all MLP neurons
    universal_removed: int = 0  # universal neurons displaced from the circuit (and refilled)
    prompts: dict = field(default_factory=dict)  # {"positive": n, "negative": n, "sha256": str}
    settings: dict = field(default_factory=dict)  # how it was selected: sign, layers, filter, seed, ...
    score: str = "delta"  # what neurons were ranked by: delta (the paper), projection, attribution, target
    experts: dict | None = None  # mixtures of experts: each layer's layout and each expert's routing frequency
    stability: dict = field(default_factory=dict)  # resampling summary (cna.stability.Stability.summary); {}: not run

    @property
    def k(self) -> int:
        return len(self.neurons)

    @property
    def layer_counts(self) -> dict[int, int]:
        counts = dict.fromkeys(range(self.n_layers), 0)
        for neuron in self.neurons:
            counts[neuron.layer] += 1
        return counts

    @property
    def expert_counts(self) -> dict[tuple[int, int | None], int]:
        """Neurons per (layer, expert), expert None for dense layers; only pairs that have some."""
        counts: dict[tuple[int, int | None], int] = {}
        for neuron in self.neurons:
            counts[(neuron.layer, neuron.expert)] = counts.get((neuron.layer, neuron.expert), 0) + 1
        return counts

    def by_layer(self) -> dict[int, list[Neuron]]:
        layers: dict[int, list[Neuron]] = {}
        for neuron in self.neurons:
            layers.setdefault(neuron.layer, []).append(neuron)
        return layers

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "score": self.score,
            "k": self.k,
            "k_fraction": self.k_fraction,
            "neurons": [neuron.to_dict() for neuron in self.neurons],
            "universal_removed": self.universal_removed,
            "layer_counts": {str(layer): count for layer, count in self.layer_counts.items()},
            "n_layers": self.n_layers,
            "neurons_per_layer": self.neurons_per_layer,
            "prompts": self.prompts,
            "settings": self.settings,
            **({"experts": self.experts} if self.experts is not None else {}),
            **({"stability": self.stability} if self.stability else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Circuit:
        """From circuit.json; a file carrying only the contract's neuron fields (layer, index, delta) reads too."""
        neurons = [Neuron(int(n["layer"]), int(n["index"]), float(n.get("delta", 0.0)),
                          float(n.get("positive_mean", 0.0)), float(n.get("negative_mean", 0.0)),
                          None if n.get("score") is None else float(n["score"]),
                          None if n.get("expert") is None else int(n["expert"]),
                          None if n.get("selection_frequency") is None else float(n["selection_frequency"]))
                   for n in data["neurons"]]
        n_layers = data.get("n_layers")
        if n_layers is None:
            n_layers = max((n.layer for n in neurons), default=-1) + 1
        return cls(model=str(data.get("model", "?")), method=str(data.get("method", "?")), neurons=neurons,
                   n_layers=int(n_layers), neurons_per_layer=int(data.get("neurons_per_layer", 0)),
                   k_fraction=float(data.get("k_fraction", 0.0)),
                   universal_removed=int(data.get("universal_removed", 0)),
                   prompts=data.get("prompts", {}), settings=data.get("settings", {}),
                   score=str(data.get("score", "delta")), experts=data.get("experts"),
                   stability=data.get("stability") or {})

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        return cls.from_dict(read_json(path))


@dataclass
class ResidualDirection:
    """A residual-stream mean difference (positive - negative): what CAA adds and directional ablation removes."""

    model: str
    method: str
    source_layer: int  # the layer whose output the mean difference was measured at
    layers: list[int]  # the layers whose output the intervention edits
    vector: list[float]
    n_layers: int
    prompts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return math.sqrt(sum(v * v for v in self.vector))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "source_layer": self.source_layer,
            "layers": self.layers,
            "vector_norm": self.norm,
            "hidden_size": len(self.vector),
            "n_layers": self.n_layers,
            "prompts": self.prompts,
            "settings": self.settings,
            "vector": self.vector,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ResidualDirection:
        return cls(
            model=data["model"],
            method=data["method"],
            source_layer=data["source_layer"],
            layers=list(data["layers"]),
            vector=list(data["vector"]),
            n_layers=data["n_layers"],
            prompts=data.get("prompts", {}),
            settings=data.get("settings", {}),
        )

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ResidualDirection:
        return cls.from_dict(read_json(path))


@dataclass
class ExpertChoice:
    """The router baseline (neuron-free): routed experts whose gate logits are shifted before the routing decision.

    Each entry is {"layer", "expert", "shift", "positive_frequency", "negative_frequency"}: at strength alpha the
    expert's logit moves by alpha x shift (negative: suppressed, positive: boosted); the frequencies are how often
    the router chose it at the prompts' position on each discovery set.
    """

    model: str
    method: str
    experts: list[dict]
    n_layers: int
    n_routed: int
    prompts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def by_layer(self) -> dict[int, list[dict]]:
        layers: dict[int, list[dict]] = {}
        for entry in self.experts:
            layers.setdefault(int(entry["layer"]), []).append(entry)
        return layers

    def to_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "n_experts": len(self.experts), "experts": self.experts,
                "n_layers": self.n_layers, "n_routed": self.n_routed, "prompts": self.prompts,
                "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict) -> ExpertChoice:
        return cls(model=data["model"], method=data["method"], experts=list(data["experts"]),
                   n_layers=data["n_layers"], n_routed=data["n_routed"], prompts=data.get("prompts", {}),
                   settings=data.get("settings", {}))

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ExpertChoice:
        return cls.from_dict(read_json(path))


def overlap(a: Circuit, b: Circuit) -> list[tuple[int, ...]]:
    """The neurons present in both circuits, sorted: (layer, index), or (layer, expert, index) in MoE layers."""
    return sorted({n.key for n in a.neurons} & {n.key for n in b.neurons})


def localisation(circuit: Circuit, top_n: int = 200) -> dict:
    """Where the top-n neurons by |delta| sit: fraction in the final 3 layers and in the final quarter.

    Paper tables 6-7. Uses all neurons when the circuit has fewer than top_n.
    """
    top = sorted(circuit.neurons, key=lambda n: (-abs(n.delta), n.layer, n.index))[:top_n]
    if not top:
        raise ValueError("localisation of an empty circuit")
    final_quarter_start = math.floor(0.75 * circuit.n_layers)
    where = {
        "n": len(top),
        "final_3_layers": sum(n.layer >= circuit.n_layers - 3 for n in top) / len(top),
        "final_quarter": sum(n.layer >= final_quarter_start for n in top) / len(top),
        "final_quarter_start_layer": final_quarter_start,
    }
    if circuit.experts is not None:  # the expert axis: which experts the top neurons sit in
        where.update(expert_localisation(Circuit(circuit.model, circuit.method, top, circuit.n_layers,
                                                 circuit.neurons_per_layer, experts=circuit.experts)))
    return where


def expert_localisation(circuit: Circuit) -> dict:
    """Where a MoE circuit's neurons sit among the experts: how many (layer, expert) pairs hold them, the largest
    pair's share, and the shares in routed experts, shared experts and dense layers."""
    layout = circuit.experts["layout"]
    counts = circuit.expert_counts
    n = max(circuit.k, 1)

    def kind(layer: int, expert: int | None) -> str:
        if expert is None:
            return "dense"
        return "routed" if expert < layout[layer]["experts"] else "shared"

    shares = {name: sum(c for (layer, expert), c in counts.items() if kind(layer, expert) == name) / n
              for name in ("routed", "shared", "dense")}
    return {"expert_pairs": len(counts), "largest_expert_share": max(counts.values(), default=0) / n,
            "routed_fraction": shares["routed"], "shared_fraction": shares["shared"],
            "dense_fraction": shares["dense"]}
