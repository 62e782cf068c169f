"""CAA, contrastive activation addition (Rimsky et al. 2024), the paper's baseline: subtract alpha * scale *
(mean positive - mean negative residual) from the residual stream after one layer.

alpha = 1 with scale = 1 moves the average positive prompt's last-token residual onto the average negative
one's at that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from cna.circuit import ResidualDirection
from cna.discovery import POSITIONS, layer_at_fraction, residual_direction
from cna.errors import ConfigError
from cna.interventions import POSITIONS as STEERED_POSITIONS
from cna.interventions import Intervention, SteeringVector
from cna.methods import register_method
from cna.methods.base import DiscoverySets, Statistics, SteeringMethod
from cna.models import ArchitectureAdapter
from cna.schema import bounded, choice


@dataclass
class ResidualConfig:
    """What every residual-stream method sets: where the mean difference is measured, and where steering acts."""

    name: str = "caa"
    layer_fraction: float = bounded(0.5, 0, 1)  # the layer, as a fraction of depth
    layer: int | None = bounded(None, 0, integer=True)  # or an explicit layer index
    position: str = choice("last", POSITIONS)  # the token whose residual stands for a prompt
    positions: str = choice("all", STEERED_POSITIONS)  # where steering acts


@dataclass
class CaaConfig(ResidualConfig):
    """`method=caa` (conf/method/caa.yaml)."""

    scale: float = 1.0  # 1: alpha = 1 moves the average positive residual onto the average negative one


@register_method
class CaaMethod(SteeringMethod):
    name = "caa"
    config_type = CaaConfig
    order = 20
    colour = "#d62728"
    marker = "s"

    def takes_multipliers(self) -> bool:
        """m = 1 - alpha: m = 0 subtracts the vector (removal), m = 2 adds it (induction at the strength that moves
        an average negative prompt onto the positive mean), m = 4 adds it three times; directional ablation (a
        subclass) scales the direction's projection by m."""
        return True

    def check_shape(self, n_layers: int, neurons_per_layer: int | None, model_name: str) -> None:
        layer = self.config.layer
        if layer is not None and not 0 <= layer < n_layers:
            raise ConfigError(f"method.layer: expected a layer in [0, {n_layers}) (model {model_name} has "
                              f"{n_layers} layers), got {layer!r}")

    def layer(self, n_layers: int) -> int:
        layer = self.config.layer if self.config.layer is not None else layer_at_fraction(n_layers,
                                                                                           self.config.layer_fraction)
        if not 0 <= layer < n_layers:
            raise ConfigError(f"method.layer: expected a layer in [0, {n_layers}), got {layer}")
        return layer

    def edited_layers(self, layer: int, n_layers: int) -> list[int]:
        return [layer]

    def settings(self) -> dict:
        return {"position": self.config.position, "scale": self.config.scale}

    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> ResidualDirection:
        n_layers = statistics.adapter.n_layers
        layer = self.layer(n_layers)
        positive = statistics.activations(sets.positive, "positive", position=self.config.position)
        negative = statistics.activations(sets.negative, "negative", position=self.config.position)
        return residual_direction(positive, negative, model=model_name, method=self.name, source_layer=layer,
                                  layers=self.edited_layers(layer, n_layers), prompts=sets.provenance(),
                                  settings=self.settings())

    def intervention(self, adapter: ArchitectureAdapter, found: ResidualDirection) -> Intervention:
        return SteeringVector(adapter, found, scale=self.config.scale, positions=self.config.positions)

    def describe(self) -> dict:
        return {"layer": self.config.layer, "layer_fraction": self.config.layer_fraction, "scale": self.config.scale}
