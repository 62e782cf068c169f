"""Start-up validation of a composed job config: one line naming the key and what it expects.

Everything here runs before a model loads, so a typo costs a second, not a model load.
Checks that need the files (missing data, empty prompt sets, an evaluation size larger
than its dataset) happen when the pipeline reads the data, also before the model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from cna.attribution import GRADIENT_SCORES, SCORES
from cna.discovery import POSITIONS, SIGNS, resolve_layer_range
from cna.errors import ConfigError
from cna.evaluation.kl import KL_DIRECTIONS
from cna.interventions import NEURON_MODES
from cna.interventions import POSITIONS as STEER_POSITIONS
from cna.models import (
    DTYPES,
    MODEL_CACHE_ENV,
    QUANTIZATIONS,
    ModelShape,
    ModelSpec,
    local_config,
    model_cache,
    quantization_unavailable,
    read_model_shape,
    resolve_device,
)
from cna.tracking import server_reachable

HUB_ENDPOINT_ENV, DEFAULT_HUB_ENDPOINT = "HF_ENDPOINT", "https://huggingface.co"


@dataclass
class ModelConfig(ModelSpec):
    """A conf/model/*.yaml file: how to load the model (ModelSpec's keys, typed) and how to present prompts to it.

    Each file lists `_schema` first in its defaults and sets only what differs; Hydra rejects an unknown key
    or a value of the wrong type when it composes the config (`validate` catches one added with +model.KEY).
    """

    template: str = "chat"  # chat: the tokenizer's chat template; raw: the text as it is (base models)


ConfigStore.instance().store(group="model", name="_schema", node=ModelConfig)

METHODS = ("cna", "caa", "direction", "random", "router")
NEURON_METHODS = ("cna", "random")
# What a hyper-parameter sweeper may minimise (cfg.search), and the evaluator each one needs.
SEARCH_METRICS = {"refusal_rate": "eval.refusal.n", "kl_divergence": "eval.kl.n",
                  "over_refusal_rate": "eval.over_refusal"}


def _fail(key: str, expected: str, got) -> None:
    raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _choice(cfg: DictConfig, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        _fail(key, f"one of {', '.join(map(str, choices))}", value)


def _fraction(cfg: DictConfig, key: str, *, low_open: bool = True, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        _fail(key, "a number in (0, 1]" if low_open else "a number in [0, 1]", value)


def _count(cfg: DictConfig, key: str, *, allow_none: bool = True, minimum: int = 0) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(key, f"an integer >= {minimum}" + (" or null" if allow_none else ""), value)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value."""
    _count(cfg, "seed", allow_none=False)
    _validate_method(cfg)
    _validate_sweep(cfg)
    for key in ("prompts.n_positive", "prompts.n_negative"):
        _count(cfg, key, minimum=1)
    _fraction(cfg, "prompts.dedup_threshold")
    _count(cfg, "eval.refusal.n", allow_none=False)
    for key in ("eval.mmlu.n", "eval.mmlu.k_shot", "eval.kl.n", "eval.classifier_window"):
        _count(cfg, key)
    _choice(cfg, "eval.kl.direction", KL_DIRECTIONS)
    for name in (cfg.eval.over_refusal or {}):
        _count(cfg, f"eval.over_refusal.{name}.n")
    for name in (cfg.eval.get("generalisation") or {}):
        _count(cfg, f"eval.generalisation.{name}.n", minimum=1)
    _count(cfg, "eval.quality_n", allow_none=False, minimum=1)
    _count(cfg, "batch_size", allow_none=False, minimum=1)
    _count(cfg, "discovery_batch_tokens", minimum=1)
    _count(cfg, "scoring_batch_tokens", minimum=1)
    _count(cfg, "max_new_tokens", allow_none=False, minimum=1)
    for key in ("prefix_reuse_mib", "prefix_reuse_disk_mib", "prefix_cache_mib"):
        _count(cfg, key, allow_none=False)
    _choice(cfg, "logger.name", ("wandb", "none"))
    for key in ("reuse_baseline", "refill_generation", "bake_steering"):
        _choice(cfg, key, (True, False))
    _validate_search(cfg)
    validate_judge(cfg)
    _validate_model(cfg)  # last: it may probe the network when the model is not on this machine


def _validate_search(cfg: DictConfig) -> None:
    search = cfg.get("search")
    if search is None:
        return
    objectives = search.get("objectives")
    if not objectives:
        _fail("search.objectives", f"a non-empty list from {', '.join(SEARCH_METRICS)}", objectives)
    for i, name in enumerate(objectives):
        if name not in SEARCH_METRICS:
            _fail(f"search.objectives[{i}]", f"one of {', '.join(SEARCH_METRICS)}", name)
        needed = SEARCH_METRICS[name]
        measured = OmegaConf.select(cfg, needed)
        if name == "over_refusal_rate":
            measured = any(entry.n for entry in (measured or {}).values())
        if not measured:
            _fail(f"search.objectives[{i}]", f"a metric this job measures ({needed} is off)", name)
    _fraction(cfg, "search.min_quality", low_open=False, allow_none=True)


def validate_judge(cfg: DictConfig) -> None:
    """The `eval.judge` node: which judge, which backend, and the numbers each needs."""
    from cna.evaluation.judges import BACKENDS, JUDGES

    judge = OmegaConf.select(cfg, "eval.judge")
    if judge is None or judge.get("name") == "none":
        return
    _choice(cfg, "eval.judge.name", JUDGES)
    _choice(cfg, "eval.judge.backend", BACKENDS)
    for key in ("batch_size", "max_new_tokens", "max_response_chars", "concurrency"):
        _count(cfg, f"eval.judge.{key}", allow_none=False, minimum=1)
    _count(cfg, "eval.judge.retries", allow_none=False)
    timeout = judge.get("timeout_s")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        _fail("eval.judge.timeout_s", "a number of seconds > 0", timeout)
    if not isinstance(judge.get("model"), str) or not judge.model:
        _fail("eval.judge.model", "a hub id, a folder or a served model name", judge.get("model"))
    if judge.backend == "openai" and not str(judge.get("base_url") or "").startswith(("http://", "https://")):
        _fail("eval.judge.base_url", "an http(s) URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1",
              judge.get("base_url"))
    if judge.backend == "hf":
        _choice(cfg, "eval.judge.dtype", ("auto", *DTYPES))
        if judge.path is not None and not (Path(judge.path).expanduser() / "config.json").is_file():
            _fail("eval.judge.path", "a model folder with a config.json", judge.path)


def _validate_model(cfg: DictConfig) -> None:
    model = cfg.model
    known = [field.name for field in fields(ModelConfig)]
    for key in model:
        if key not in known:  # `+model.KEY=...` gets past the schema
            raise ConfigError(f"model.{key}: unknown key; a model config has {', '.join(known)}")
    _choice(cfg, "model.dtype", ("auto", *DTYPES))
    _choice(cfg, "model.template", ("chat", "raw"))
    if model.quantization is not None:
        _choice(cfg, "model.quantization", (None, *QUANTIZATIONS))
        problem = quantization_unavailable(model.quantization, resolve_device(model.device))
        if problem:
            raise ConfigError(problem)
    if model.path is not None and not (Path(model.path).expanduser() / "config.json").is_file():
        _fail("model.path", "a model folder with a config.json", model.path)
    config = local_config(model.name, path=model.path, local_name=model.local_name, revision=model.revision)
    if config is None:
        _require_hub(cfg)
        return  # the depth and width checks run once the model has loaded
    shape = read_model_shape(config)
    if shape is not None:
        _validate_model_shape(cfg, shape)


def _require_hub(cfg: DictConfig) -> None:
    """A model that is not on this machine comes from the hub: fail in seconds when the hub cannot be reached."""
    model = cfg.model
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


def _validate_model_shape(cfg: DictConfig, shape: ModelShape) -> None:
    """The layer, neuron and expert counts the method asks for, against the model's config.json (no weights loaded)."""
    method, n_layers, neurons_per_layer = cfg.method, shape.n_layers, shape.neurons_per_layer
    depth = f"(model {cfg.model.name} has {n_layers} layers)"
    if method.name == "router":
        if not shape.moe_layers:
            _fail("method.name", f"a method for dense models: {cfg.model.name} has no routed experts", "router")
        if method.n_experts > len(shape.moe_layers) * shape.experts:
            _fail("method.n_experts", f"at most {len(shape.moe_layers) * shape.experts} (the routed experts of "
                  f"{cfg.model.name}: {shape.experts} in each of {len(shape.moe_layers)} layers)", method.n_experts)
        return
    if method.name not in NEURON_METHODS:
        if method.layer is not None and not 0 <= method.layer < n_layers:
            _fail("method.layer", f"a layer in [0, {n_layers}) {depth}", method.layer)
        return
    requested = OmegaConf.to_object(method.layers) if method.layers is not None else None
    start, stop = resolve_layer_range(requested, n_layers) or (0, n_layers)
    available = shape.neurons_in(start, stop)
    if method.k is not None and available is not None:
        where = f"layers [{start}, {stop})" if requested is not None else f"{n_layers} layers"
        per_layer = "with their routed and shared experts" if shape.moe_layers else f"x {neurons_per_layer}"
        if method.k > available:
            _fail("method.k", f"at most {available} (the MLP neurons in {where} {per_layer} of "
                  f"{cfg.model.name})", method.k)


def _validate_method(cfg: DictConfig) -> None:
    _choice(cfg, "method.name", METHODS)
    _choice(cfg, "method.position", POSITIONS)
    _choice(cfg, "method.positions", STEER_POSITIONS)
    if cfg.method.name in NEURON_METHODS:
        if cfg.method.k is None:
            _fraction(cfg, "method.k_fraction")
        else:
            _count(cfg, "method.k", allow_none=False, minimum=1)
        _choice(cfg, "method.sign", SIGNS)
        _choice(cfg, "method.mode", NEURON_MODES)
        _validate_score(cfg)
        _fraction(cfg, "method.universal.top_fraction")
        _fraction(cfg, "method.universal.threshold")
        _validate_layer_range(cfg)
    elif cfg.method.name == "router":  # mixtures of experts (issue 27)
        _count(cfg, "method.n_experts", allow_none=False, minimum=1)
        _choice(cfg, "method.sign", SIGNS)
        scale = cfg.method.scale
        if not isinstance(scale, int | float) or isinstance(scale, bool) or scale <= 0:
            _fail("method.scale", "a gate-logit shift > 0", scale)
        _validate_layer_range(cfg)
    else:
        _fraction(cfg, "method.layer_fraction", low_open=False)
        _count(cfg, "method.layer")


def _validate_score(cfg: DictConfig) -> None:
    """method.score and the settings its metric needs (cna.attribution)."""
    _choice(cfg, "method.score", SCORES)
    _fraction(cfg, "method.direction_layer_fraction", low_open=False)
    _count(cfg, "method.direction_layer")
    if cfg.method.score in GRADIENT_SCORES and cfg.method.position != "last":
        _fail("method.position", f"last for method.score={cfg.method.score} (gradients at the last prompt token)",
              cfg.method.position)
    starts = cfg.method.refusal_starts
    if cfg.method.score == "attribution" and (not starts or not all(isinstance(s, str) and s for s in starts)):
        _fail("method.refusal_starts", "a non-empty list of response openings such as \"I'm sorry\"",
              OmegaConf.to_object(starts) if isinstance(starts, ListConfig) else starts)


def _validate_layer_range(cfg: DictConfig) -> None:
    """method.layers: null, layer indices [start, stop), or fractions of depth such as [0.9, 1.0] (the final 10%)."""
    layers = cfg.method.layers
    if layers is None:
        return
    values = list(layers) if isinstance(layers, ListConfig) else None
    if values is not None and len(values) == 2 and values[0] is not None:
        start, stop = values
        numbers = all(v is None or isinstance(v, int | float) and not isinstance(v, bool) for v in (start, stop))
        if numbers and (isinstance(start, float) or isinstance(stop, float)):
            if 0 <= start < (1.0 if stop is None else stop) <= 1:
                return
        elif numbers and start >= 0 and (stop is None or start < stop):
            return
    _fail("method.layers", "null, layer indices [start, stop) with 0 <= start < stop, or fractions of depth "
          "[a, b) with 0 <= a < b <= 1 such as [0.9, 1.0] (stop null: to the last layer)",
          OmegaConf.to_object(layers) if isinstance(layers, ListConfig) else layers)


def _validate_sweep(cfg: DictConfig) -> None:
    if cfg.multipliers is not None:
        if cfg.method.name not in NEURON_METHODS:
            _fail("multipliers", f"null for method {cfg.method.name} (multipliers scale neurons)",
                  OmegaConf.to_object(cfg.multipliers))
        for i, value in enumerate(cfg.multipliers):
            if not isinstance(value, int | float) or value < 0:
                _fail(f"multipliers[{i}]", "a number >= 0", value)
        return
    if not cfg.alphas:
        _fail("alphas", "a non-empty list of numbers in [0, 1]", cfg.alphas)
    for i, value in enumerate(cfg.alphas):
        if not isinstance(value, int | float) or not 0 <= value <= 1:
            _fail(f"alphas[{i}]", "a number in [0, 1]", value)
