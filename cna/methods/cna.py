"""CNA, the paper's method: the top k MLP neurons by contrastive score, scaled by m = 1 - alpha.

Discovery: every neuron's mean activation at the last prompt token over the positive and the negative set;
its score is delta = mean(positive) - mean(negative) (the paper), or its projection on the residual mean
difference, or an attribution-patching estimate of its effect (cna/attribution.py). The top k by the score
(k a fraction of all MLP neurons, or a count; by |score| or one sign; optionally within a layer range) form
the circuit, after dropping *universal* neurons that are among the most active on almost any prompt
(the paper's section 3.2) and refilling from the ranking.

Beyond the paper: `stability` repeats the selection on resampled discovery sets (cna/stability.py) and may steer the
circuit's stable core or the rest instead; `cards` describes every circuit neuron (cna/neurons.py, `neurons.md`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cna.attribution import GRADIENT_SCORES, SCORES, GradientStatistics, score_metric, score_neurons
from cna.circuit import Circuit
from cna.data import packaged_prompts
from cna.discovery import (
    POSITIONS,
    SIGNS,
    ActivationStatistics,
    NeuronScores,
    eligible_ranking,
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
from cna.model_shape import ModelShape
from cna.models import ArchitectureAdapter
from cna.neurons import NeuronCard, eligible_ranks, neuron_cards
from cna.schema import bounded, choice
from cna.stability import (
    SUBSETS,
    PromptValues,
    candidate_neurons,
    measure_stability,
    output_weights,
    prompt_values,
    subset_circuit,
    with_frequencies,
)

log = logging.getLogger(__name__)

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
class StabilityConfig:
    """Discovery repeated on resampled discovery sets, from per-prompt values of a candidate pool recorded once."""

    resamples: int = bounded(0, 0, integer=True)  # 0: off; N subsets of each set, and the two disjoint halves
    fraction: float = bounded(0.5, 0, 1, low_open=True)  # of each discovery set per resample, without replacement
    candidates: int | None = bounded(None, 1, integer=True)  # the recorded pool; null: max(4096, 4k) best
    core_threshold: float = bounded(0.8, 0, 1, low_open=True)  # the stable core: chosen in at least this share
    steer: str = choice("full", SUBSETS)  # full | core | rest | core_matched (cna.stability.subset_circuit)
    seed: int = bounded(0, 0, integer=True)  # the resamples
    subset_seed: int = bounded(0, 0, integer=True)  # the draw of `rest` and `core_matched`


@dataclass
class CardsConfig:
    """One card per circuit neuron: neurons.md / neurons.json in the run folder and a W&B table."""

    enabled: bool = True
    tokens: int = bounded(10, 1, integer=True)  # promoted and suppressed tokens per neuron
    prompts: int = bounded(3, 0, integer=True)  # most and least activating discovery prompts per neuron
    effect: str = choice("auto", ("auto", "none", *GRADIENT_SCORES))  # auto: the job's gradient score, if any


EFFECT_METRICS = {"attribution": "the refusal log-odds at the first response token",
                  "target": "the target minus counterfactual logit"}


@dataclass
class Selection:
    """What a circuit is chosen from: every neuron's scores, the universal neurons left out, the layer range."""

    scores: NeuronScores
    universal: torch.Tensor | None
    layers: tuple[int, int | None] | None
    direction_layer: int
    gradients: GradientStatistics | None = None  # behind a gradient score

    def ranking(self, sign: str) -> torch.Tensor:
        """Eligible flat neuron ids, best first: the order the circuit takes its k from."""
        return eligible_ranking(self.scores.ranking, sign, self.layers, self.universal)


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
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    cards: CardsConfig = field(default_factory=CardsConfig)


@register_method
class CnaMethod(SteeringMethod):
    name = "cna"
    config_type = CnaConfig
    order = 10
    neuron_level = True
    colour = "#1f77b4"
    marker = "o"

    config: CnaConfig

    def __init__(self, config: CnaConfig):
        super().__init__(config)
        # The last selection and pool values, and what they were made from: the cards reuse discovery's, not a
        # second read (or, without a cache, a second pass).
        self._selected: tuple[Statistics, DiscoverySets, Selection, dict] | None = None
        self._values: tuple[Statistics, DiscoverySets, PromptValues] | None = None

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
        stability = config.stability
        if stability.resamples and self.name != "cna":
            raise ConfigError(f"method.stability.resamples: expected 0 for method {self.name} (resampling repeats "
                              f"CNA's selection), got {stability.resamples}")
        if stability.steer != "full" and not stability.resamples:
            raise ConfigError(f"method.stability.resamples: expected at least 1 for method.stability.steer="
                              f"{stability.steer}, got {stability.resamples}")

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
        if shape.moe_layers:
            self.check_dense(model_name)

    def check_dense(self, model_name: str) -> None:
        """Stability keys neurons by (layer, index), which an expert's neuron (layer, expert, index) is not."""
        if self.config.stability.resamples:
            raise ConfigError(f"method.stability.resamples: expected 0 for {model_name}, a mixture of experts "
                              f"(stability supports dense models only), got {self.config.stability.resamples}")

    def filter_statistics(self, statistics: Statistics) -> ActivationStatistics | None:
        """The diverse prompts' statistics behind the universal filter: they depend on the model alone, so one
        cached computation serves every job."""
        universal = self.config.universal
        if not universal.enabled:
            return None
        return statistics.activations(packaged_prompts("diverse"), "diverse", position=self.config.position,
                                      top_fraction=universal.top_fraction)

    def direction_layer(self, n_layers: int) -> int:
        """projection: the layer of the residual mean difference."""
        config = self.config
        return (config.direction_layer if config.direction_layer is not None
                else layer_at_fraction(n_layers, config.direction_layer_fraction))

    def metric(self, statistics: Statistics, sets: DiscoverySets, score: str):
        """The behaviour metric M of a gradient score, and what identifies it (cna.attribution.score_metric)."""
        return score_metric(score, statistics.tokenizer, refusal_starts=self.config.refusal_starts,
                            positive=sets.positive, negative=sets.negative, sources=sets.sources)

    def scores(self, statistics: Statistics, sets: DiscoverySets) -> tuple[NeuronScores, dict]:
        """Every neuron's score and the settings that produced it (for circuit.json)."""
        scores, settings, _ = self.scores_and_gradients(statistics, sets)
        return scores, settings

    def scores_and_gradients(self, statistics: Statistics, sets: DiscoverySets,
                             ) -> tuple[NeuronScores, dict, GradientStatistics | None]:
        """`scores`, with the positive set's gradient sums behind a gradient score (None for the others)."""
        config, adapter = self.config, statistics.adapter
        positive = statistics.activations(sets.positive, "positive", position=config.position)
        negative = statistics.activations(sets.negative, "negative", position=config.position)
        gradients = None
        if config.score in GRADIENT_SCORES:
            metric, metric_id = self.metric(statistics, sets, config.score)
            gradients = statistics.gradients(sets.positive, metric, metric_id, position=config.position)
        direction_layer = self.direction_layer(adapter.n_layers)
        scores = score_neurons(config.score, positive, negative, adapter, direction_layer=direction_layer,
                               gradients=gradients)
        settings = {"position": config.position, "mode": config.mode, "layers_requested": config.layers,
                    "score": config.score,
                    **({"direction_layer": direction_layer} if config.score == "projection" else {}),
                    **({"refusal_starts": list(config.refusal_starts)} if config.score == "attribution" else {})}
        return scores, settings, gradients

    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> Circuit:
        if statistics.adapter.has_experts:  # where config.json could not be read before the model loaded
            self.check_dense(model_name)
        circuit, chosen, _ = self.circuit_and_selection(statistics, sets, model_name=model_name)
        if self.config.stability.resamples:
            circuit = self.resampled(statistics, sets, circuit, chosen)
        return circuit

    def selection(self, statistics: Statistics, sets: DiscoverySets) -> tuple[Selection, dict]:
        """The scores, universal neurons and layer range a circuit is chosen from (cached statistics), and the
        settings circuit.json records."""
        if self._selected is not None and self._selected[0] is statistics and self._selected[1] is sets:
            return self._selected[2], self._selected[3]
        config, n_layers = self.config, statistics.adapter.n_layers
        diverse = self.filter_statistics(statistics)
        scores, settings, gradients = self.scores_and_gradients(statistics, sets)
        universal = None if diverse is None else universal_neurons(diverse, config.universal.threshold)
        chosen = Selection(scores, universal, resolve_layer_range(config.layers, n_layers),
                           self.direction_layer(n_layers), gradients)
        self._selected = (statistics, sets, chosen, settings)
        return chosen, settings

    def circuit_and_selection(self, statistics: Statistics, sets: DiscoverySets, *,
                              model_name: str) -> tuple[Circuit, Selection, dict]:
        config = self.config
        chosen, settings = self.selection(statistics, sets)
        filtered = chosen.universal is not None
        circuit = select_circuit(
            chosen.scores, model=model_name, k_fraction=config.k_fraction, k=config.k, sign=config.sign,
            layers=chosen.layers, universal=chosen.universal, prompts=sets.provenance(),
            settings={**settings,
                      "universal_threshold": config.universal.threshold if filtered else None,
                      "universal_top_fraction": config.universal.top_fraction if filtered else None})
        return circuit, chosen, settings

    def circuit_and_scores(self, statistics: Statistics, sets: DiscoverySets, *,
                           model_name: str) -> tuple[Circuit, NeuronScores]:
        circuit, chosen, _ = self.circuit_and_selection(statistics, sets, model_name=model_name)
        return circuit, chosen.scores

    # --- what the circuit's neurons are: stability and cards ------------------------------------------------------

    def candidate_pool(self, chosen: Selection, k: int) -> torch.Tensor:
        """The neurons whose per-prompt values are recorded: resampled circuits choose from them, cards read them."""
        config = self.config
        return candidate_neurons(chosen.scores, k=k, sign=config.sign, layers=chosen.layers,
                                 universal=chosen.universal, count=config.stability.candidates)

    def pool_values(self, statistics: Statistics, sets: DiscoverySets, pool: torch.Tensor,
                    chosen: Selection) -> PromptValues:
        """The pool's per-prompt values with what the job's score needs to be recomputed on a subset (cached)."""
        last = self._values
        if last is not None and last[0] is statistics and last[1] is sets and torch.equal(last[2].neurons, pool):
            return last[2]
        score = self.config.score
        metric, metric_id = self.metric(statistics, sets, score) if score in GRADIENT_SCORES else (None, None)
        residual_layer = chosen.direction_layer if score == "projection" else None
        values = prompt_values(statistics, sets, pool, position=self.config.position, metric=metric,
                               metric_id=metric_id, residual_layer=residual_layer)
        self._values = (statistics, sets, values)
        return values

    def resampled(self, statistics: Statistics, sets: DiscoverySets, circuit: Circuit, chosen: Selection) -> Circuit:
        """Each neuron's selection frequency over resampled discovery sets, and the circuit `stability.steer` names:
        the full circuit, its stable core, or a draw from the rest."""
        config, settings = self.config, self.config.stability
        pool = self.candidate_pool(chosen, circuit.k)
        values = self.pool_values(statistics, sets, pool, chosen)
        writes = output_weights(statistics.adapter, pool) if config.score == "projection" else None
        stability = measure_stability(values, circuit, score=config.score, sign=config.sign,
                                      resamples=settings.resamples, fraction=settings.fraction, seed=settings.seed,
                                      core_threshold=settings.core_threshold, writes=writes)
        return subset_circuit(with_frequencies(circuit, stability), stability, settings.steer, settings.subset_seed)

    def neuron_cards(self, statistics: Statistics, sets: DiscoverySets,
                     found: Circuit) -> tuple[list[NeuronCard], dict] | None:
        config = self.config
        if not config.cards.enabled:
            return None
        if statistics.adapter.has_experts:  # cards read (layer, index) neurons; on by default, so skipped, not refused
            log.info("neuron cards: not written for %s, a mixture of experts (dense models only)", found.model)
            return None
        adapter, width = statistics.adapter, found.neurons_per_layer
        chosen, _ = self.selection(statistics, sets)
        # The pool of the full circuit (a sweep over k shares it); stability recorded it with the score's values.
        pool = self.candidate_pool(chosen, int(found.stability.get("k", found.k)))
        flats = [n.layer * width + n.index for n in found.neurons]
        if set(flats) <= set(pool.tolist()):
            values = (self.pool_values(statistics, sets, pool, chosen) if config.stability.resamples
                      else prompt_values(statistics, sets, pool, position=config.position))
        else:  # a random circuit's neurons mostly lie outside the pool
            values = prompt_values(statistics, sets, torch.tensor(flats), position=config.position)
        effect = config.cards.effect
        if effect == "auto":
            effect = config.score if config.score in GRADIENT_SCORES else "none"
        gradients = chosen.gradients if effect == config.score else None
        if effect != "none" and gradients is None:
            metric, metric_id = self.metric(statistics, sets, effect)
            gradients = statistics.gradients(sets.positive, metric, metric_id, position=config.position)
        cards = neuron_cards(adapter, statistics.tokenizer, found, values, positive=sets.positive,
                             negative=sets.negative,
                             ranks=eligible_ranks(chosen.ranking(config.sign), width, [n.key for n in found.neurons]),
                             gradients=gradients, negative_mean=chosen.scores.negative_mean,
                             tokens=config.cards.tokens, prompts=config.cards.prompts)
        header = {"model": found.model, "method": found.method, "score": found.score, "sign": config.sign,
                  "k": found.k, "metric": EFFECT_METRICS.get(effect), "stability": found.stability,
                  "subset": found.settings.get("stability_subset", "full")}
        return cards, header

    def intervention(self, adapter: ArchitectureAdapter, found: Circuit) -> NeuronScale:
        return NeuronScale(adapter, found, mode=self.config.mode, positions=self.config.positions)

    def describe(self) -> dict:
        config = self.config
        return {"k_fraction": config.k_fraction, "k": config.k, "sign": config.sign, "score": config.score}
