"""CNA, the paper's method: the top k MLP neurons by contrastive score, scaled by m = 1 - alpha.

Discovery: every neuron's mean activation at the last prompt token over the positive and the negative set;
its score is delta = mean(positive) - mean(negative) (the paper), or its projection on the residual mean
difference, or an attribution-patching estimate of its effect (cna/attribution.py). The top k by the score
(k a fraction of all MLP neurons, or a count; by |score| or one sign; optionally within a layer range) form
the circuit, after dropping *universal* neurons that are among the most active on almost any prompt
(the paper's section 3.2) and refilling from the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cna.attribution import GRADIENT_SCORES, SCORES, score_metric, score_neurons
from cna.circuit import Circuit
from cna.data import packaged_prompts
from cna.discovery import (
    POSITIONS,
    SIGNS,
    ActivationStatistics,
    NeuronScores,
    layer_at_fraction,
    resolve_layer_range,
    select_circuit,
    universal_neurons,
)
from cna.errors import ConfigError
from cna.interventions import NEURON_MODES, NeuronScale
from cna.interventions import POSITIONS as STEERED_POSITIONS
from cna.methods import register_method
from cna.methods.base import DiscoverySets, Statistics, SteeringMethod
from cna.models import ArchitectureAdapter, ModelShape
from cna.schema import bounded, choice

DEFAULT_REFUSAL_STARTS = ["I'm sorry", "I cannot", "I can't", "Sorry"]


def check_layer_range(layers) -> None:
    """method.layers: null, layer indices [start, stop), or fractions of depth such as [0.9, 1.0] (the final 10%)."""
    if layers is None:
        return
    values = list(layers) if isinstance(layers, list | tuple) else None
    if values is not None and len(values) == 2 and values[0] is not None:
        start, stop = values
        numbers = all(v is None or isinstance(v, int | float) and not isinstance(v, bool) for v in (start, stop))
        if numbers and (isinstance(start, float) or isinstance(stop, float)):
            if 0 <= start < (1.0 if stop is None else stop) <= 1:
                return
        elif numbers and start >= 0 and (stop is None or start < stop):
            return
    raise ConfigError("method.layers: expected null, layer indices [start, stop) with 0 <= start < stop, or "
                      "fractions of depth [a, b) with 0 <= a < b <= 1 such as [0.9, 1.0] (stop null: to the last "
                      f"layer), got {layers!r}")


@dataclass
class UniversalConfig:
    """The universal-neuron filter: drop neurons in the top `top_fraction` of |activation| on >= `threshold`
    of a diverse prompt set (packaged with cna)."""

    enabled: bool = True
    top_fraction: float = bounded(0.001, 0, 1, low_open=True)
    threshold: float = bounded(0.8, 0, 1, low_open=True)


@dataclass
class CnaConfig:
    """`method=cna` (conf/method/cna.yaml)."""

    name: str = "cna"
    k_fraction: float | None = bounded(0.001, 0, 1, low_open=True)  # of all MLP neurons (the paper's 0.1%)
    k: int | None = bounded(None, 1, integer=True)  # an absolute count instead
    sign: str = choice("abs", SIGNS)  # rank by |score|, or by one sign of it
    score: str = choice("delta", SCORES)  # delta (the paper) | projection | attribution | target
    direction_layer_fraction: float = bounded(0.5, 0, 1)  # projection: the residual mean difference at this depth
    direction_layer: int | None = bounded(None, 0, integer=True)  # or an explicit layer
    refusal_starts: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_STARTS))  # attribution's metric
    layers: list | None = None  # layer indices [start, stop) or fractions of depth ([0.9, 1.0]: the final 10%)
    position: str = choice("last", POSITIONS)  # the token whose activation stands for a prompt
    universal: UniversalConfig = field(default_factory=UniversalConfig)
    mode: str = choice("scale", NEURON_MODES)  # scale: m * x; mean: toward the negative-set mean
    positions: str = choice("all", STEERED_POSITIONS)  # where steering acts
    seed: int = bounded(0, 0, integer=True)  # the random control's draw


@register_method
class CnaMethod(SteeringMethod):
    name = "cna"
    config_type = CnaConfig
    order = 10
    neuron_level = True
    colour = "#1f77b4"
    marker = "o"

    config: CnaConfig

    def check(self) -> None:
        config = self.config
        if config.k is None and config.k_fraction is None:
            raise ConfigError("method.k_fraction: expected a number in (0, 1] (or set method.k), got None")
        if config.score in GRADIENT_SCORES and config.position != "last":
            raise ConfigError(f"method.position: expected last for method.score={config.score} (gradients at the "
                              f"last prompt token), got {config.position!r}")
        starts = config.refusal_starts
        if config.score == "attribution" and (not starts or not all(isinstance(s, str) and s for s in starts)):
            raise ConfigError("method.refusal_starts: expected a non-empty list of response openings such as "
                              f"\"I'm sorry\", got {starts!r}")
        check_layer_range(config.layers)

    def check_shape(self, n_layers: int, neurons_per_layer: int | None, model_name: str) -> None:
        self.check_model_shape(ModelShape(n_layers, neurons_per_layer), model_name)

    def check_model_shape(self, shape: ModelShape, model_name: str) -> None:
        config, n_layers = self.config, shape.n_layers
        start, stop = resolve_layer_range(config.layers, n_layers) or (0, n_layers)
        available = shape.neurons_in(start, stop)  # a mixture of experts: routed and shared experts' neurons
        if config.k is not None and available is not None:
            where = f"layers [{start}, {stop})" if config.layers is not None else f"{n_layers} layers"
            per_layer = "with their routed and shared experts" if shape.moe_layers else f"x {shape.neurons_per_layer}"
            if config.k > available:
                raise ConfigError(f"method.k: expected at most {available} (the MLP neurons in {where} {per_layer} "
                                  f"of {model_name}), got {config.k!r}")

    def filter_statistics(self, statistics: Statistics) -> ActivationStatistics | None:
        """The diverse prompts' statistics behind the universal filter: they depend on the model alone, so one
        cached computation serves every job."""
        universal = self.config.universal
        if not universal.enabled:
            return None
        return statistics.activations(packaged_prompts("diverse"), "diverse", position=self.config.position,
                                      top_fraction=universal.top_fraction)

    def scores(self, statistics: Statistics, sets: DiscoverySets) -> tuple[NeuronScores, dict]:
        """Every neuron's score and the settings that produced it (for circuit.json)."""
        config, adapter = self.config, statistics.adapter
        positive = statistics.activations(sets.positive, "positive", position=config.position)
        negative = statistics.activations(sets.negative, "negative", position=config.position)
        gradients = None
        if config.score in GRADIENT_SCORES:
            metric, metric_id = score_metric(config.score, statistics.tokenizer, refusal_starts=config.refusal_starts,
                                             positive=sets.positive, negative=sets.negative, sources=sets.sources)
            gradients = statistics.gradients(sets.positive, metric, metric_id, position=config.position)
        direction_layer = (config.direction_layer if config.direction_layer is not None
                           else layer_at_fraction(adapter.n_layers, config.direction_layer_fraction))
        scores = score_neurons(config.score, positive, negative, adapter, direction_layer=direction_layer,
                               gradients=gradients)
        settings = {"position": config.position, "mode": config.mode, "layers_requested": config.layers,
                    "score": config.score,
                    **({"direction_layer": direction_layer} if config.score == "projection" else {}),
                    **({"refusal_starts": list(config.refusal_starts)} if config.score == "attribution" else {})}
        return scores, settings

    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> Circuit:
        return self.circuit_and_scores(statistics, sets, model_name=model_name)[0]

    def circuit_and_scores(self, statistics: Statistics, sets: DiscoverySets, *,
                           model_name: str) -> tuple[Circuit, NeuronScores]:
        config, adapter = self.config, statistics.adapter
        diverse = self.filter_statistics(statistics)
        scores, settings = self.scores(statistics, sets)
        universal = None if diverse is None else universal_neurons(diverse, config.universal.threshold)
        circuit = select_circuit(
            scores, model=model_name, k_fraction=config.k_fraction, k=config.k, sign=config.sign,
            layers=resolve_layer_range(config.layers, adapter.n_layers), universal=universal,
            prompts=sets.provenance(),
            settings={**settings,
                      "universal_threshold": config.universal.threshold if universal is not None else None,
                      "universal_top_fraction": config.universal.top_fraction if universal is not None else None})
        return circuit, scores

    def intervention(self, adapter: ArchitectureAdapter, found: Circuit) -> NeuronScale:
        return NeuronScale(adapter, found, mode=self.config.mode, positions=self.config.positions)

    def describe(self) -> dict:
        config = self.config
        return {"k_fraction": config.k_fraction, "k": config.k, "sign": config.sign, "score": config.score}
