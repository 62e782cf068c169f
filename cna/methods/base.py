"""What every steering method is: a config, a discovery step that turns statistics into a circuit or a
direction, and the intervention that steers with it.

Discovery reads `Statistics`: forward-only activation sums (and, for causal scores, gradient sums) over prompt
sets, computed in batches and cached on disk by everything they depend on, so a sweep over a method's knobs
runs its forward passes once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cna.attribution import GradientStatistics, collect_gradients
from cna.cache import StatisticsCache, statistics_key
from cna.circuit import Circuit, ExpertChoice, ResidualDirection
from cna.data import PromptSource, encode_prompts, prompt_sets_sha256
from cna.discovery import DISCOVERY_TOKEN_BUDGET, ActivationStatistics, collect_statistics
from cna.interventions import Intervention
from cna.model_shape import ModelShape
from cna.models import ArchitectureAdapter, activation_identity_of

Found = Circuit | ResidualDirection | ExpertChoice  # ExpertChoice: the router baseline's (mixtures of experts)


@dataclass
class DiscoverySets:
    """The two contrastive prompt sets, where they came from, and what circuit.json records about them."""

    positive: list[str]
    negative: list[str]
    sources: dict[str, PromptSource] = field(default_factory=dict)  # for scores that read targets from the rows
    removed_duplicates: dict[str, int] = field(default_factory=dict)
    overlap: dict[str, int] = field(default_factory=dict)  # discovery prompts found in each evaluated set

    @property
    def in_sample(self) -> bool:
        """Discovery shares prompts with what the job evaluates (the paper's Table 3 setting)."""
        return any(self.overlap.values())

    def provenance(self) -> dict:
        return {"positive": len(self.positive), "negative": len(self.negative),
                "sha256": prompt_sets_sha256(self.positive, self.negative),
                "duplicates_removed": self.removed_duplicates, "in_sample": self.in_sample, "overlap": self.overlap}


class Statistics:
    """Discovery statistics of one loaded model, batched and cached on disk (`cache=None`: computed every time)."""

    def __init__(self, model, tokenizer, *, template: str = "chat", cache: StatisticsCache | None = None,
                 batch_size: int = 16, max_batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET, progress: bool = True,
                 adapter: ArchitectureAdapter | None = None, identity: dict | None = None,
                 system_prompt: str | None = None, template_kwargs: dict | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system_prompt, self.template_kwargs = system_prompt, dict(template_kwargs or {})
        self.adapter = adapter or ArchitectureAdapter(model)
        self.cache = cache or StatisticsCache(None)
        self.batch_size, self.max_batch_tokens, self.progress = batch_size, max_batch_tokens, progress
        self.identity = identity or activation_identity_of(model)
        self.site = f"{self.adapter.model_type}:{self.adapter.family.neuron_site}"

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, self.template, system_prompt=self.system_prompt,
                              template_kwargs=self.template_kwargs)

    def prompt_format(self) -> dict | None:
        """A system prompt and chat-template arguments, for the cache key (None without either: the old keys)."""
        if self.system_prompt is None and not self.template_kwargs:
            return None
        return {"system_prompt": self.system_prompt, "chat_template_kwargs": self.template_kwargs}

    def activations(self, prompts: Sequence[str], desc: str, *, position: str = "last",
                    top_fraction: float | None = None) -> ActivationStatistics:
        """Running sums of every neuron and every layer's residual over the prompts (and top counts)."""
        encoded = self.encode(prompts)
        key = statistics_key(model=self.identity, site=self.site, prompts=encoded, position=position,
                             top_fraction=top_fraction, prompt_format=self.prompt_format())
        return self.cache.get_or_compute(key, lambda: collect_statistics(
            self.adapter, encoded, pad_token_id=self.tokenizer.pad_token_id, batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens, position=position, top_fraction=top_fraction, desc=desc,
            progress=self.progress))

    def gradients(self, prompts: Sequence[str], metric: Callable, metric_id: dict, *,
                  position: str = "last") -> GradientStatistics:
        """Sums of activation x gradient of `metric` at the last prompt token (causal scores)."""
        encoded = self.encode(prompts)
        key = statistics_key(model=self.identity, site=self.site, prompts=encoded, position=position,
                             top_fraction=None, score=metric_id, prompt_format=self.prompt_format())
        return self.cache.get_or_compute(key, lambda: collect_gradients(
            self.adapter, encoded, metric, pad_token_id=self.tokenizer.pad_token_id, batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens, desc=metric_id.get("score", "gradients"),
            progress=self.progress), load=GradientStatistics.load)


class SteeringMethod(ABC):
    """One steering method: its config type, how it discovers what it steers with, and how it steers.

    `neuron_level` methods steer MLP neurons: their points may be given as multipliers m (m > 1 amplifies) and
    their circuits have neurons; the others steer the residual stream along a direction.
    """

    name: ClassVar[str]  # the registry key, `method.name`
    config_type: ClassVar[type]
    neuron_level: ClassVar[bool] = False
    order: ClassVar[int] = 100  # its place in listings and on the dashboard (then by name)
    colour: ClassVar[str] = "#9467bd"  # its colour on the dashboard
    marker: ClassVar[str] = "D"  # its marker in the report's figures

    def __init__(self, config):
        self.config = config

    def takes_multipliers(self) -> bool:
        """Whether its points may be given as multipliers m = 1 - alpha, m > 1 amplifying: neuron methods."""
        return self.neuron_level

    def check(self) -> None:  # noqa: B027 - a method whose settings are independent has nothing to check
        """Raise ConfigError (one line naming the key) where settings contradict each other; before any model
        loads. Each setting's own type and allowed values are checked already (its config's schema)."""

    def check_shape(self, n_layers: int, neurons_per_layer: int | None, model_name: str) -> None:  # noqa: B027
        """Raise ConfigError where the settings do not fit a model of this shape (read from its config.json)."""

    def check_model_shape(self, shape: ModelShape, model_name: str) -> None:
        """`check_shape` with all config.json says, a mixture of experts' layers and experts too (validation calls
        this; methods that count experts or expert neurons override it)."""
        self.check_shape(shape.n_layers, shape.neurons_per_layer, model_name)

    def filter_statistics(self, statistics: Statistics) -> ActivationStatistics | None:
        """The statistics behind a filter that depends on the model alone (the universal-neuron filter), or None."""
        return None

    @abstractmethod
    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> Found:
        """The circuit or direction from the two prompt sets."""

    @abstractmethod
    def intervention(self, adapter: ArchitectureAdapter, found: Found) -> Intervention:
        """The intervention that steers with what `discover` found."""

    def neuron_cards(self, statistics: Statistics, sets: DiscoverySets, found: Found) -> tuple[list, dict] | None:
        """One card per circuit neuron and the page's header (cna.neurons.write_cards); None: the method has none."""
        return None

    def describe(self) -> dict[str, Any]:
        """Settings W&B and the report show beside the method's name."""
        return {}
