"""Start-up checks of a typed job config: one line naming the key and what it expects.

Everything here runs before a model loads, so a typo costs a second, not a model load. Each setting's type
is Hydra's business (the schemas in cna.config) and its allowed values its dataclass field's (cna.schema);
this module runs those, then what crosses settings: the method's own cross-field checks, the strength points,
the search objectives, each metric's needs (a judge server that answers), and the model (its folder, the
hub when it is not on this machine, and its depth and width from config.json against what the method asks).
Checks that need the data files run when the pipeline reads them, also before the model loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from cna.config import JobConfig
from cna.engines import engine_types
from cna.errors import ConfigError
from cna.evaluation.metric import metric_types, search_objectives
from cna.methods import make_method
from cna.methods.base import SteeringMethod
from cna.model_shape import local_config, read_model_shape
from cna.models import MODEL_CACHE_ENV, model_cache, quantization_unavailable, resolve_device
from cna.network import server_reachable
from cna.schema import check_settings, shown

HUB_ENDPOINT_ENV, DEFAULT_HUB_ENDPOINT = "HF_ENDPOINT", "https://huggingface.co"


def validate(job: JobConfig) -> SteeringMethod:
    """Raise ConfigError on the first bad value; return the job's method, checked."""
    check_settings(job, skip=("model", "prompts", "method", "eval", "logger", "cache", "sweep", "settings"))
    check_settings(job.cache)
    for path, part in (("model", job.model), ("prompts", job.prompts), ("method", job.method),
                       ("logger", job.logger), ("engine", job.engine)):
        check_settings(part, path)
    check_settings(job.eval, "eval", skip=("metrics",))
    check_settings(job.eval.metrics, "eval")
    method = make_method(job.method)
    method.check()
    _validate_sweep(job, method)
    _validate_search(job)
    _validate_behaviour(job)
    known = metric_types()
    for name, config in job.eval.metrics.items():
        known[name].check(config)
    engine_types()[job.engine.name].check(job.engine, job)  # what the engine cannot express, before any model loads
    _validate_model(job, method)  # last: it may probe the network when the model is not on this machine
    return method


def _validate_sweep(job: JobConfig, method: SteeringMethod) -> None:
    sweep = job.sweep
    if sweep.multipliers is not None:
        if not method.takes_multipliers():
            raise ConfigError(f"multipliers: expected null for method {job.method.name} (multipliers scale "
                              f"neurons or CAA's vector), got {sweep.multipliers!r}")
        for i, value in enumerate(sweep.multipliers):
            if value < 0:
                raise ConfigError(f"multipliers[{i}]: expected a number >= 0, got {shown(value)}")
        return
    if not sweep.alphas:
        raise ConfigError(f"alphas: expected a non-empty list of numbers in [0, 1], got {sweep.alphas!r}")
    for i, value in enumerate(sweep.alphas):
        if not 0 <= value <= 1:
            raise ConfigError(f"alphas[{i}]: expected a number in [0, 1], got {shown(value)}")


def _validate_search(job: JobConfig) -> None:
    search = job.sweep.search
    if search is None:
        return
    check_settings(search, "search")
    objectives = search_objectives()
    if not search.objectives:
        raise ConfigError(f"search.objectives: expected a non-empty list from {', '.join(objectives)}, "
                          f"got {search.objectives!r}")
    for i, name in enumerate(search.objectives):
        if name not in objectives:
            raise ConfigError(f"search.objectives[{i}]: expected one of {', '.join(objectives)}, got {name!r}")
        if _switched_off(job.eval.metrics.get(objectives[name])):
            raise ConfigError(f"search.objectives[{i}]: expected a metric this job measures (eval.{objectives[name]} "
                              f"is off), got {name!r}")


def _validate_behaviour(job: JobConfig) -> None:
    """The behaviour's metric is one the job measures, and its expected effects are fields that metric writes."""
    behaviour = job.behaviour
    check_settings(behaviour, "behaviour")
    metric = metric_types().get(behaviour.metric)
    if metric is None or behaviour.metric not in job.eval.metrics:
        raise ConfigError(f"behaviour.metric: expected a metric this job measures ({', '.join(job.eval.metrics)}), "
                          f"got {behaviour.metric!r}")
    names = [f.name for m in metric_types().values() for f in m.fields]
    for side in ("remove", "induce"):
        name = getattr(behaviour, side).field
        if name not in names:
            raise ConfigError(f"behaviour.{side}.field: expected a point field of a metric (e.g. "
                              f"{', '.join(f.name for f in metric.fields)}), got {name!r}")


def _switched_off(config) -> bool:
    """A metric config that measures nothing: absent, n = 0, or a mapping of sets that are all n = 0."""
    if config is None:
        return True
    if isinstance(config, dict):
        return not any(getattr(entry, "n", 1) for entry in config.values())
    return getattr(config, "n", 1) == 0


def _validate_model(job: JobConfig, method: SteeringMethod) -> None:
    model = job.model
    if model.template == "raw":
        for key in ("system_prompt", "chat_template_kwargs"):
            if getattr(model, key):
                raise ConfigError(f"model.{key}: needs model.template=chat (a raw prompt has no chat template), "
                                  f"got {getattr(model, key)!r}")
    if model.quantization is not None:
        problem = quantization_unavailable(model.quantization, resolve_device(model.device))
        if problem:
            raise ConfigError(problem)
    if model.path is not None and not (Path(model.path).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.path: expected a model folder with a config.json, got {model.path!r}")
    config = local_config(model.name, path=model.path, local_name=model.local_name, revision=model.revision)
    if config is None:
        _require_hub(job)
        return  # the depth and width checks run once the model has loaded
    shape = read_model_shape(config)
    if shape is not None:
        method.check_model_shape(shape, model.name)


def _require_hub(job: JobConfig) -> None:
    """A model that is not on this machine comes from the hub: fail in seconds when the hub cannot be reached."""
    model = job.model
    endpoint = os.environ.get(HUB_ENDPOINT_ENV) or DEFAULT_HUB_ENDPOINT
    if _offline():
        why = "the hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    elif not server_reachable(endpoint):
        why = f"{endpoint} cannot be reached"
    else:
        return
    folder = model_cache() / (model.local_name or model.name.split("/")[-1])
    raise ConfigError(
        f"model: '{model.name}' is not in the model cache ({folder}; ${MODEL_CACHE_ENV} moves it) and {why}; "
        f"fetch it there (`huggingface-cli download {model.name} --local-dir {folder}` where the hub is reachable"
        ", or `make models` for the offline models) or set model.path=FOLDER"
    )


def _offline() -> bool:
    return any(os.environ.get(flag, "").lower() in ("1", "true", "yes") for flag in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))
