"""The control the paper lacks: as many random neurons per layer as the CNA circuit, steered the same way.

It discovers the CNA circuit of the same settings, then draws (with `method.seed`) the same number of neurons
in each of its layers from the neurons the circuit does not use.
"""

from __future__ import annotations

from cna.circuit import Circuit
from cna.discovery import random_circuit
from cna.methods import register_method
from cna.methods.base import DiscoverySets, Statistics
from cna.methods.cna import CnaConfig, CnaMethod


@register_method
class RandomMethod(CnaMethod):
    name = "random"
    config_type = CnaConfig
    order = 40
    colour = "#7f7f7f"
    marker = "x"

    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> Circuit:
        circuit, scores = self.circuit_and_scores(statistics, sets, model_name=model_name)
        return random_circuit(circuit, scores, self.config.seed)
