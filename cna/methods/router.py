"""The router baseline for mixtures of experts (neuron-free, beside CAA and directional ablation).

Discovery: how often the router chose each routed expert at the prompts' position, on each set (the statistics
count it while they sum neuron activations). The `n_experts` (layer, expert) pairs whose frequency differs most
(positive - negative, ranked as `sign` says) are kept. Steering: at strength alpha, each kept expert's gate logit
moves by alpha x scale before the router decides, down for experts the positive set favours (suppressed), up for
those the negative set favours (boosted); the router's own rule then picks the experts and their weights from the
shifted logits (cna.experts.reroute), so alpha = 0 is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cna.circuit import ExpertChoice
from cna.discovery import POSITIONS, SIGNS, ActivationStatistics, rank_neurons, resolve_layer_range
from cna.errors import ConfigError
from cna.interventions import POSITIONS as STEERED_POSITIONS
from cna.interventions import RouterBias
from cna.methods import register_method
from cna.methods.base import DiscoverySets, Statistics, SteeringMethod
from cna.methods.cna import check_layer_range
from cna.model_shape import ModelShape
from cna.models import ArchitectureAdapter
from cna.schema import bounded, choice


@dataclass
class RouterConfig:
    """`method=router` (conf/method/router.yaml)."""

    name: str = "router"
    n_experts: int = bounded(8, 1, integer=True)  # (layer, expert) pairs, over all MoE layers
    sign: str = choice("abs", SIGNS)  # abs: suppress and boost | positive: only suppress | negative: only boost
    scale: float = bounded(10.0, 0, low_open=True)  # the gate-logit shift at alpha = 1 (logit units)
    layers: list | None = None  # layer indices [start, stop) or fractions of depth
    position: str = choice("last", POSITIONS)  # the token whose routing stands for a prompt
    positions: str = choice("all", STEERED_POSITIONS)  # where steering acts


@register_method
class RouterMethod(SteeringMethod):
    name = "router"
    config_type = RouterConfig
    order = 50
    colour = "#8c564b"
    marker = "v"

    config: RouterConfig

    def check(self) -> None:
        check_layer_range(self.config.layers)

    def check_model_shape(self, shape: ModelShape, model_name: str) -> None:
        if not shape.moe_layers:
            raise ConfigError(f"method.name: expected a method for dense models ({model_name} has no routed "
                              "experts), got 'router'")
        routed = len(shape.moe_layers) * shape.experts
        if self.config.n_experts > routed:
            raise ConfigError(f"method.n_experts: expected at most {routed} (the routed experts of {model_name}: "
                              f"{shape.experts} in each of {len(shape.moe_layers)} layers), got "
                              f"{self.config.n_experts!r}")

    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> ExpertChoice:
        config, adapter = self.config, statistics.adapter
        if not adapter.has_experts:
            raise ConfigError(f"method.name: expected a method for dense models (model_type "
                              f"'{adapter.model_type}' has no routed experts), got 'router'")
        positive = statistics.activations(sets.positive, "positive", position=config.position)
        negative = statistics.activations(sets.negative, "negative", position=config.position)
        return select_experts(positive, negative, model=model_name, n_experts=config.n_experts, sign=config.sign,
                              scale=config.scale, layers=resolve_layer_range(config.layers, adapter.n_layers),
                              prompts=sets.provenance(),
                              settings={"position": config.position, "layers_requested": config.layers})

    def intervention(self, adapter: ArchitectureAdapter, found: ExpertChoice) -> RouterBias:
        return RouterBias(adapter, found, positions=self.config.positions)

    def describe(self) -> dict:
        return {"n_experts": self.config.n_experts, "sign": self.config.sign, "scale": self.config.scale}


def select_experts(
    positive: ActivationStatistics,
    negative: ActivationStatistics,
    *,
    model: str,
    n_experts: int,
    sign: str = "abs",
    scale: float = 10.0,
    layers: tuple[int, int] | None = None,
    prompts: dict | None = None,
    settings: dict | None = None,
) -> ExpertChoice:
    """The router baseline's experts: the `n_experts` (layer, expert) pairs whose routing frequency at the prompts'
    position differs most between the sets (positive - negative, ranked as `sign` says; ties by layer, then expert).

    Experts the positive set favours are suppressed (their gate logit moves by -scale at alpha = 1), experts the
    negative set favours boosted (+scale): `positive` picks only the first kind, `negative` only the second.
    """
    if positive.routing_sum is None or negative.routing_sum is None:
        raise ConfigError("method router: the model has no routed experts (its statistics count no routing)")
    if scale <= 0:
        raise ConfigError(f"method.scale: expected a logit shift > 0, got {scale}")
    difference = positive.routing_frequency - negative.routing_frequency
    routed = torch.zeros_like(difference, dtype=torch.bool)
    for layer, spec in enumerate(positive.layout.layers):
        routed[layer, : spec.get("experts", 0)] = True
    ranked = rank_neurons(difference, sign, layers, valid=routed)
    if not 1 <= n_experts <= len(ranked):
        raise ConfigError(f"method.n_experts: expected 1 to {len(ranked)} (the routed experts searched), "
                          f"got {n_experts}")
    width = difference.shape[1]
    entries = []
    for flat in ranked[:n_experts].tolist():
        layer, expert = divmod(flat, width)
        favoured_by_positive = sign == "positive" or (sign == "abs" and difference[layer, expert] >= 0)
        entries.append({"layer": layer, "expert": expert, "shift": -scale if favoured_by_positive else scale,
                        "positive_frequency": float(positive.routing_frequency[layer, expert]),
                        "negative_frequency": float(negative.routing_frequency[layer, expert])})
    return ExpertChoice(model=model, method="router", experts=entries, n_layers=difference.shape[0],
                        n_routed=positive.layout.n_routed, prompts=prompts or {},
                        settings={"sign": sign, "scale": scale, "layers": list(layers) if layers else None,
                                  **(settings or {})})
