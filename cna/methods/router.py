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

from cna.circuit import ExpertChoice
from cna.discovery import POSITIONS, SIGNS, resolve_layer_range, select_experts
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
