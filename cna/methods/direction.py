"""Directional ablation (Arditi et al. 2024): remove alpha times the projection on the unit mean-difference
direction, measured at one layer, from the embeddings and from every attention and MLP block's output, so no
block reads it (baked: cna.export.export_orthogonalised_model).
"""

from __future__ import annotations

from dataclasses import dataclass

from cna.circuit import ResidualDirection
from cna.interventions import DirectionAblation, Intervention
from cna.methods import register_method
from cna.methods.caa import CaaMethod, ResidualConfig
from cna.models import ArchitectureAdapter


@dataclass
class DirectionConfig(ResidualConfig):
    """`method=direction` (conf/method/direction.yaml): the direction is measured at `layer`, removed everywhere."""

    name: str = "direction"


@register_method
class DirectionMethod(CaaMethod):
    name = "direction"
    config_type = DirectionConfig
    order = 30
    colour = "#2ca02c"
    marker = "^"

    def edited_layers(self, layer: int, n_layers: int) -> list[int]:
        return list(range(n_layers))

    def settings(self) -> dict:
        return {"position": self.config.position}

    def intervention(self, adapter: ArchitectureAdapter, found: ResidualDirection) -> Intervention:
        return DirectionAblation(adapter, found, positions=self.config.positions)

    def describe(self) -> dict:
        return {"layer": self.config.layer, "layer_fraction": self.config.layer_fraction}
