"""The job config, typed: one dataclass per config group, Hydra's schemas, and the one reader of Hydra's config.

`launch.py` composes `conf/config.yaml` with Hydra; `JobConfig.from_hydra(cfg)` turns the composed DictConfig
into plain dataclasses (the model, the prompt sets, the method's and every metric's config, the logger, the
cache and the sweep), and nothing below the entry points sees a DictConfig. Every dataclass is registered
as a structured-config schema, so Hydra rejects an unknown key or a value of the wrong type while composing;
the values each setting accepts are declared beside its field (cna.schema) and checked, with the cross-field
and model-shape checks, by `cna.validation.validate` before any model loads.

The plug-ins' configs (cna.methods, cna.evaluation.metric) are registered from their registries: a method's
schema is `method/_<name>_schema`, a metric's `metric/_<name>_schema` (conf/method/*.yaml and
conf/metric/*.yaml list theirs first in their defaults).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from cna.data import TEMPLATES, PromptSource
from cna.engines import engine_types
from cna.engines.hf import HfEngineConfig
from cna.errors import ConfigError
from cna.evaluation.judges import JUDGES
from cna.evaluation.metric import metric_types
from cna.methods import method_types
from cna.models import DTYPES, QUANTIZATIONS, ModelSpec
from cna.reasoning import REASONING
from cna.schema import bounded, choice

CONF = Path(__file__).resolve().parents[1] / "conf"
LOGGERS = ("wandb", "none")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
EXPECTATIONS = ("decrease", "increase")
# Settings of `eval` shared by every metric that reads responses; its other keys are metrics.
EVAL_SETTINGS = ("quality_n", "classifier_window")


# --- the groups ---------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig(ModelSpec):
    """A conf/model/*.yaml file: how to load the model (ModelSpec's keys) and how to present prompts to it."""

    dtype: str = choice("auto", ("auto", *DTYPES))  # auto: float32 on CPU, bfloat16 on CUDA
    quantization: str | None = choice(None, (None, *QUANTIZATIONS))
    template: str = choice("chat", TEMPLATES)  # chat: the tokenizer's chat template; raw: the text (base models)
    system_prompt: str | None = None  # a system turn before every prompt (chat template only)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false} for Qwen3
    reasoning: str = choice("auto", REASONING)  # reasoning blocks removed from answers (cna.reasoning); auto: by
    #                                             the tokenizer's markers (</think>, gpt-oss's channels)
    reasoning_tokens: int = bounded(1024, 1, integer=True)  # the most a reasoning block may take; then it is closed

    def spec(self) -> ModelSpec:
        return ModelSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSpec)})


@dataclass
class PromptsConfig:
    """A conf/prompts/*.yaml file: the contrastive discovery sets."""

    name: str = "custom"
    positive: PromptSource = field(default_factory=PromptSource)  # prompts showing the behaviour
    negative: PromptSource = field(default_factory=PromptSource)  # prompts without it
    n_positive: int | None = bounded(None, 1, integer=True)  # drawn with the job's seed (null: all)
    n_negative: int | None = bounded(None, 1, integer=True)
    dedup: bool = False  # drop exact and near copies of the evaluation sets' prompts first
    dedup_threshold: float = bounded(0.8, 0, 1, low_open=True)


@dataclass
class BehaviourEffect:
    """One expected effect of steering a behaviour: the point field that shows it and which way it should move."""

    field: str = "refusal_rate"
    expect: str = choice("decrease", EXPECTATIONS)


@dataclass
class BehaviourConfig:
    """A conf/behaviour/*.yaml file: what is steered and how it is measured.

    The file selects the discovery pair (`prompts`) and the evaluation (`eval`, holding the behaviour's metric
    with its held-out sets); this node names the behaviour, its metric plug-in, and the effects expected of
    removal (ablation, alpha > 0, on the positive side) and of induction (amplification, m > 1, on the negative
    side). It labels results, the report, W&B and the dashboard; it measures nothing itself.
    """

    name: str = "refusal"
    metric: str = "refusal"  # the metric plug-in under `eval` that measures it
    remove: BehaviourEffect = field(default_factory=BehaviourEffect)
    induce: BehaviourEffect = field(default_factory=lambda: BehaviourEffect("over_refusal_rate", "increase"))
    about: str = ""


@dataclass
class LoggerConfig:
    """A conf/logger/*.yaml file: W&B (`wandb`) or nothing (`none`)."""

    name: str = choice("none", LOGGERS)
    project: str = "cna"
    entity: str | None = None
    mode: str = choice("auto", LOGGER_MODES)  # auto: online with an API key and a reachable server, else offline
    console: str = "off"  # W&B's copy of stdout/stderr; the job has its own log file


@dataclass
class SearchConfig:
    """`search`: what launch.py returns to Hydra's Optuna sweeper (experiment=recipe_search)."""

    objectives: list[str] = field(default_factory=list)  # point fields to minimise (cna.evaluation.metric)
    min_quality: float | None = bounded(None, 0, 1)  # a point below it is infeasible


@dataclass
class EvalConfig:
    """`eval`: how responses are scored, and the config of every metric the job measures (by name)."""

    quality_n: int = bounded(3, 1, integer=True)  # quality = 1 - repeated word n-grams of this size
    classifier_window: int | None = bounded(256, 0, integer=True)  # characters the keyword classifier reads
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheConfig:
    """What a sweep's jobs share on disk, and how much memory and disk layer-prefix reuse may take."""

    dir: str | None = None  # statistics, baselines, prefixes, judge verdicts
    reuse_baseline: bool = True  # the unsteered point is computed once per model and evaluation
    prefix_reuse_mib: int = bounded(1024, 0, integer=True)
    prefix_reuse_disk_mib: int = bounded(4096, 0, integer=True)
    prefix_cache_mib: int = bounded(4096, 0, integer=True)


@dataclass
class SweepConfig:
    """The strength points of a job, and what a hyper-parameter sweeper minimises."""

    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    multipliers: list[float] | None = None  # explicit m for neuron methods instead of alphas (m > 1 amplifies)
    search: SearchConfig | None = None


@dataclass
class JobSchema:
    """conf/config.yaml's own keys, typed (the groups carry their own schemas)."""

    model: Any = None
    prompts: Any = None
    behaviour: Any = None
    method: Any = None
    eval: Any = None
    logger: Any = None
    engine: Any = None
    data_dir: str = "../shared/data"
    cache_dir: str | None = None
    seed: int = bounded(0, 0, integer=True)
    batch_size: int = bounded(32, 1, integer=True)
    discovery_batch_tokens: int | None = bounded(256, 1, integer=True)
    scoring_batch_tokens: int | None = bounded(1024, 1, integer=True)
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    multipliers: list[float] | None = None
    max_new_tokens: int = bounded(48, 1, integer=True)
    resume: bool = True
    prefix_reuse_mib: int = bounded(1024, 0, integer=True)
    prefix_reuse_disk_mib: int = bounded(4096, 0, integer=True)
    prefix_cache_mib: int = bounded(4096, 0, integer=True)
    refill_generation: bool = True
    bake_steering: bool = False
    reuse_baseline: bool = True
    search: Any = None  # a SearchConfig (converted by from_hydra: OmegaConf cannot merge into a null dataclass)
    knobs: dict[str, Any] = field(default_factory=dict)  # an experiment's own variables that other keys interpolate


# --- the job ------------------------------------------------------------------------------------------------------

@dataclass
class JobConfig:
    """Everything one job needs, typed; built by `from_hydra` (launch.py) or directly in Python."""

    model: ModelConfig
    prompts: PromptsConfig
    method: Any  # the method's config dataclass (cna.methods), e.g. CnaConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    engine: Any = field(default_factory=HfEngineConfig)  # the engine's config dataclass (cna.engines)
    data_dir: str = "../shared/data"
    seed: int = bounded(0, 0, integer=True)
    batch_size: int = bounded(32, 1, integer=True)  # generation, MMLU and KL batches
    discovery_batch_tokens: int | None = bounded(256, 1, integer=True)  # most padded tokens per discovery batch
    scoring_batch_tokens: int | None = bounded(1024, 1, integer=True)  # most padded tokens per MMLU / KL batch
    max_new_tokens: int = bounded(48, 1, integer=True)
    resume: bool = True
    refill_generation: bool = True
    bake_steering: bool = False
    settings: dict = field(default_factory=dict)  # the composed config as plain values: recorded and hashed

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> JobConfig:
        """The typed job from a composed config; ConfigError (one line naming the key) where a value is wrong."""
        try:
            settings = OmegaConf.to_container(cfg, resolve=True)
        except Exception as error:  # noqa: BLE001 - OmegaConf's interpolation errors have several types
            raise ConfigError(_one_line(error)) from error
        schema: JobSchema = _typed(cfg, JobSchema, "")
        known_methods = method_types()
        method_name = OmegaConf.select(cfg, "method.name")
        if method_name not in known_methods:
            raise ConfigError(f"method.name: expected one of {', '.join(known_methods)}, got {method_name!r}")
        known_engines = engine_types()
        engine_name = OmegaConf.select(cfg, "engine.name", default="hf")
        if engine_name not in known_engines:
            raise ConfigError(f"engine.name: expected one of {', '.join(known_engines)}, got {engine_name!r}")
        engine_type = known_engines[engine_name].config_type
        return cls(
            model=_typed(cfg.model, ModelConfig, "model"),
            prompts=_typed(cfg.prompts, PromptsConfig, "prompts"),
            method=_typed(cfg.method, known_methods[method_name].config_type, "method"),
            eval=_eval_config(cfg.eval),
            behaviour=(BehaviourConfig() if cfg.get("behaviour") is None
                       else _typed(cfg.behaviour, BehaviourConfig, "behaviour")),
            logger=_typed(cfg.logger, LoggerConfig, "logger"),
            engine=engine_type() if cfg.engine is None else _typed(cfg.engine, engine_type, "engine"),
            cache=CacheConfig(schema.cache_dir, schema.reuse_baseline, schema.prefix_reuse_mib,
                              schema.prefix_reuse_disk_mib, schema.prefix_cache_mib),
            sweep=SweepConfig(list(schema.alphas), None if schema.multipliers is None else list(schema.multipliers),
                              None if cfg.search is None else _typed(cfg.search, SearchConfig, "search")),
            data_dir=schema.data_dir, seed=schema.seed, batch_size=schema.batch_size,
            discovery_batch_tokens=schema.discovery_batch_tokens, scoring_batch_tokens=schema.scoring_batch_tokens,
            max_new_tokens=schema.max_new_tokens, resume=schema.resume, refill_generation=schema.refill_generation,
            bake_steering=schema.bake_steering, settings=settings)


def _schema_node(config_type: Any):
    """The OmegaConf node a config type is enforced by: a dataclass, or dict[str, <dataclass>]."""
    if typing.get_origin(config_type) is dict:
        _, element = typing.get_args(config_type)
        return DictConfig(content={}, key_type=str, element_type=element)
    return OmegaConf.structured(config_type)


def _typed(node: Any, config_type: Any, key: str) -> Any:
    """A config node as its dataclass (or dict of them); a node composed without its schema is checked now."""
    try:
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{key}: expected a mapping, got {node!r}")
        _check_keys(node, config_type, key)
        if OmegaConf.get_type(node) is config_type:
            return OmegaConf.to_object(node)
        plain = OmegaConf.to_container(node, resolve=True)  # interpolations resolve in the whole config
        return OmegaConf.to_object(OmegaConf.merge(_schema_node(config_type), plain))
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - OmegaConf's validation errors have several types
        raise ConfigError(_one_line(error, prefix=f"{key}." if key else "")) from error


def _check_keys(node: DictConfig, config_type: Any, key: str) -> None:
    """`+group.KEY=...` adds keys past a schema: every key must be a field of its dataclass."""
    if typing.get_origin(config_type) is dict:
        element = typing.get_args(config_type)[1]
        for name, child in node.items_ex(resolve=False):
            if isinstance(child, DictConfig):
                _check_keys(child, element, f"{key}.{name}")
        return
    if not dataclasses.is_dataclass(config_type):
        return
    hints = typing.get_type_hints(config_type)
    fields = [f.name for f in dataclasses.fields(config_type)]
    for name in node:
        if name not in fields:
            raise ConfigError(f"{key}.{name}: unknown key; {key} has {', '.join(fields)}")
        child = node._get_node(name)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(hints.get(name)):
            _check_keys(child, hints[name], f"{key}.{name}")


def _eval_config(node: DictConfig) -> EvalConfig:
    known = metric_types()
    values, metrics = {}, {}
    for key in node:
        if key in EVAL_SETTINGS:
            values[key] = node[key]
        elif key in known:
            metrics[key] = _typed(node[key], known[key].config_type, f"eval.{key}")
        else:
            raise ConfigError(f"eval.{key}: unknown key; eval holds {', '.join(EVAL_SETTINGS)} and the metrics "
                              f"{', '.join(known)}")
    return EvalConfig(**values, metrics=metrics)


# --- Hydra --------------------------------------------------------------------------------------------------------

def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (again after a plug-in registers itself: stores are idempotent)."""
    store = ConfigStore.instance()
    store.store(name="_job_schema", node=JobSchema)
    store.store(group="model", name="_schema", node=ModelConfig)
    store.store(group="prompts", name="_schema", node=PromptsConfig)
    store.store(group="behaviour", name="_schema", node=BehaviourConfig)
    store.store(group="logger", name="_schema", node=LoggerConfig)
    for name, method in method_types().items():
        store.store(group="method", name=f"_{name}_schema", node=_schema_node(method.config_type))
    for name, engine in engine_types().items():
        store.store(group="engine", name=f"_{name}_schema", node=_schema_node(engine.config_type))
    for name, metric in metric_types().items():
        # A metric of named sets is typed when JobConfig reads it: OmegaConf cannot add an entry to a typed dict
        # from the command line (`+eval.generalisation.NAME={...}`).
        typed = typing.get_origin(metric.config_type) is not dict
        store.store(group="metric", name=f"_{name}_schema", node=_schema_node(metric.config_type) if typed else {})
    store.store(group="eval/judge", name="_schema", node=_schema_node(metric_types()["judge"].config_type))


register_schemas()


def compose_job(overrides: list[str] = (), config_dir: str | Path = CONF) -> JobConfig:
    """The job `launch.py OVERRIDES` would run, composed without running it; ConfigError in one line."""
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    except Exception as error:  # noqa: BLE001 - Hydra's override and composition errors have no common base
        raise ConfigError(_one_line(error)) from error
    return JobConfig.from_hydra(cfg)


def compose_typed(config_name: str, overrides: list[str], config_type: type) -> Any:
    """Another config of conf/ (e.g. conf/organism.yaml) with overrides, as its dataclass; ConfigError in one line."""
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides))
    except Exception as error:  # noqa: BLE001 - Hydra's override and composition errors have no common base
        raise ConfigError(_one_line(error)) from error
    return _typed(cfg, config_type, "")


def judge_group_overrides(overrides: list[str]) -> list[str]:
    """`eval.judge=NAME` (the form a reader expects) as Hydra's group syntax `eval/judge=NAME`.

    Hydra reads `eval.judge=strongreject` as a value for the config node, which fails; the group
    syntax selects the config file. Multirun lists (`eval.judge=yesno,strongreject`) are rewritten too.
    """
    rewritten = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "eval.judge" and value and all(name in JUDGES for name in value.split(",")):
            override = f"eval/judge={value}"
        rewritten.append(override)
    return rewritten


def override_problem(arguments: list[str], config_dir: str | Path = CONF) -> str | None:
    """Compose a command line's config once (each value of a sweep in turn) and say in one line what is wrong
    with it, or None: Hydra's own composition errors take several lines and no exit status of ours."""
    flags = [a for a in arguments if a.startswith("-")]
    if any(flag not in ("-m", "--multirun") for flag in flags):
        return None  # Hydra's other flags (--cfg, --config-dir, ...) are Hydra's business
    settings = [a for a in arguments if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(settings)
    except Exception as error:  # noqa: BLE001 - a malformed override
        return _one_line(error)
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    firsts = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in sweeps]
    trials = [base + firsts] + [base + firsts[:i] + [f"{o.get_key_element()}={value}"] + firsts[i + 1:]
                                for i, o in enumerate(sweeps) for value in list(o.sweep_string_iterator())[1:]]
    for trial in trials:
        try:
            compose_job(trial, config_dir)
        except ConfigError as error:
            return str(error)
    return None


# OmegaConf's reasons, said as the rest of cna says them.
_REASONS = (
    (re.compile(r"Value '(.*)' of type '\w+' could not be converted to Integer"), r"expected an integer, got '\1'"),
    (re.compile(r"Value '(.*)' of type '\w+' could not be converted to Float"), r"expected a number, got '\1'"),
    (re.compile(r"Value '(.*)' is not a valid bool.*"), r"expected true or false, got '\1'"),
    (re.compile(r"Key '.*' (?:not in '(\w+)'|is not in struct)"), r"unknown key (not in \1)"),
    (re.compile(r"Invalid value assigned: \w+ is not a ListConfig, list or tuple\."), "expected a list"),
)


def _one_line(error: BaseException, prefix: str = "") -> str:
    """Hydra's and OmegaConf's messages (an override, a reason, `full_key: ...`) as `key: reason`."""
    reasons = [error]
    while reasons[-1].__cause__ is not None:
        reasons.append(reasons[-1].__cause__)
    innermost = reasons[-1]
    key = getattr(innermost, "full_key", None)
    message = next((line.strip() for line in str(innermost).splitlines() if line.strip()), type(innermost).__name__)
    for pattern, said in _REASONS:
        if pattern.fullmatch(message):
            message = pattern.sub(said, message).replace(" (not in )", "")
            break
    if key:
        return f"{prefix}{key}: {message}"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"{first}: {message}" if innermost is not error and message not in first else first
