"""Metrics as plug-ins: one class and one config per measured quantity, found through a registry.

A metric is built from its config before any model loads (it reads and checks its data then), measures each
strength point under the intervention (or, for judges, just after it), and declares the point fields it
writes. The evaluator, the search objectives, the unsteered point's cache key, the report's table and the
dashboard all iterate the registry, so a new metric is one module (a `Metric` subclass decorated with
`register_metric`) and one config (its `config_type`, a dataclass that cna.config registers as a Hydra
schema; a YAML file under conf/metric/ gives its defaults). Its config sits at `eval.<name>`.

Metrics that read generated responses share them: `PointContext.responses` (cna.evaluation.evaluator)
generates a named prompt set once per point, scores every response with the keyword classifier and the
quality score, and keeps the records that become generations.jsonl lines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from cna.data import PromptSource, load_prompts, subsample
from cna.errors import ConfigError
from cna.plugins import import_package
from cna.schema import bounded

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext, Session



@dataclass(frozen=True)
class Field:
    """One value a metric adds to every strength point: a results.json point field."""

    name: str  # the point field, e.g. "mmlu_accuracy"
    label: str  # its column title in the report and its panel title on the dashboard
    ci: str | None = None  # the field holding its 95% interval, e.g. "mmlu_ci95"
    digits: str = ".3f"  # how the report prints it
    about: str = ""  # one sentence under the dashboard panel
    table: bool = True  # a column of the report's points table


@dataclass
class EvalSet:
    """A named prompt set a metric generates for: where it comes from, how many prompts (0: off)."""

    source: PromptSource = field(default_factory=PromptSource)
    n: int | None = bounded(0, 0, integer=True)


@dataclass(frozen=True)
class DataContext:
    """What a metric may read while it loads its data, before any model loads."""

    seed: int = 0
    discovery: tuple[str, ...] = ()  # the job's discovery prompts (positive and negative)
    dedup_threshold: float = 0.8
    evaluated: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # metrics built so far: their sets


class Metric(ABC):
    """One measured quantity; see the module docstring."""

    name: ClassVar[str]  # the registry key and the config key under `eval`
    config_type: ClassVar[Any]  # the config dataclass, or dict[str, <dataclass>] for a metric of named sets
    fields: ClassVar[tuple[Field, ...]] = ()
    objectives: ClassVar[tuple[str, ...]] = ()  # point fields a hyper-parameter sweeper may minimise
    stage: ClassVar[str | None] = None  # its name in results.json timings_s (default: `name`)
    steered: ClassVar[bool] = True  # measured under the intervention; False: right after it is removed
    order: ClassVar[int] = 100  # its place in the evaluator, the report's table and the dashboard (then by name)
    logged_when: ClassVar[str | None] = None  # for metrics a default job does not run: when its fields appear
    history_keys: ClassVar[tuple[str, ...]] = ()  # more W&B history keys its dashboard panel draws

    @classmethod
    def measured_fields(cls, keys: set[str]) -> tuple[Field, ...]:
        """Its fields among these point keys; a metric whose fields depend on its settings names them here."""
        return cls.fields

    @classmethod  # noqa: B027 - most metrics have nothing to check beyond their schema
    def check(cls, config) -> None:
        """Raise ConfigError (one line naming the key) where its settings contradict each other or what they
        need is missing (a server that does not answer); before any model loads."""

    @classmethod
    def held_out(cls, config) -> list[str]:
        """Every prompt of the datasets it evaluates on, for discovery to drop its copies of (default none)."""
        return []

    @classmethod
    @abstractmethod
    def from_config(cls, config, data: DataContext) -> Metric | None:
        """The metric with its data read and checked, or None where the config switches it off."""

    def evaluated_sets(self) -> dict[str, list[str]]:
        """The prompt sets it generates for, by name: the job reports how many discovery prompts each copies."""
        return {}

    @abstractmethod
    def identity(self) -> dict:
        """Everything its unsteered value depends on (its settings and its data): part of the baseline key."""

    def setup(self, session: Session) -> None:  # noqa: B027 - most metrics need nothing once the model loads
        """Work done once the model has loaded, before the first point (e.g. unsteered reference values)."""

    @abstractmethod
    def measure(self, point: PointContext) -> dict[str, Any]:
        """Its fields at one strength point."""

    def results(self) -> dict[str, Any]:
        """Job-level fields it adds to results.json (e.g. the KL direction)."""
        return {}


_REGISTRY: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make a metric known by its `name` (a later class of the same name replaces it)."""
    if not getattr(cls, "name", None) or getattr(cls, "config_type", None) is None:
        raise TypeError(f"{cls.__name__}: a metric needs a `name` and a `config_type` (a dataclass, or a dict of one)")
    _REGISTRY[cls.name] = cls
    return cls


def metric_types() -> dict[str, type[Metric]]:
    """Every registered metric by name, in their `order`; the modules of cna.evaluation register theirs on import."""
    import_package("cna.evaluation")
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))



def search_objectives() -> dict[str, str]:
    """Point field -> the metric that measures it, for every objective a sweeper may minimise."""
    return {objective: name for name, metric in metric_types().items() for objective in metric.objectives}


def evaluation_set(eval_set: EvalSet, key: str, seed: int) -> list[str]:
    """The sampled prompts of an evaluation set; ConfigError (one line naming `key`) when it cannot be had."""
    if not eval_set.n:
        return []
    prompts = load_prompts(eval_set.source)
    if not prompts:
        origin = eval_set.source.path or eval_set.source.hub or eval_set.source.packaged
        raise ConfigError(f"{key}.source: '{origin}' has no rows (expected at least {key}.n = {eval_set.n})")
    if eval_set.n > len(prompts):
        raise ConfigError(f"{key}.n: expected at most {len(prompts)} (the dataset's size), got {eval_set.n}")
    return subsample(prompts, eval_set.n, seed)
