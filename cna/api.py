"""The library in a few calls, for notebooks and scripts: no Hydra, no OmegaConf, no W&B.

    model, tokenizer = cna.load_model("smollm2-135m-instruct")
    circuit = cna.discover(model, tokenizer, harmful, harmless, k_fraction=0.005, sign="positive")
    with cna.steer(model, circuit, alpha=1.0):
        ...                                   # generate, score: the hooks are gone after the block
    results = cna.evaluate(model, tokenizer, [cna.Refusal(goals), cna.Kl(harmless_eval)], alphas=[0, 1],
                           intervention=circuit)

`launch.py` jobs run the same code: `discover` is the `cna` method plug-in, `steer` builds the method's
intervention, `evaluate` is the pipeline's evaluator.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from cna.cache import StatisticsCache
from cna.circuit import Circuit, ResidualDirection
from cna.discovery import DISCOVERY_TOKEN_BUDGET
from cna.errors import ConfigError
from cna.evaluation.evaluator import Evaluator, Session
from cna.evaluation.metric import Metric
from cna.export import export_baked_model, export_orthogonalised_model
from cna.interventions import Intervention
from cna.methods import make_method, method_types
from cna.methods.base import DiscoverySets, Found, Statistics
from cna.methods.caa import CaaConfig
from cna.methods.cna import CnaConfig, UniversalConfig
from cna.methods.direction import DirectionConfig
from cna.models import ArchitectureAdapter, ModelSpec, model_cache
from cna.models import load_model as load_spec
from cna.reasoning import reasoning_format
from cna.run_folder import Point
from cna.schema import check_settings

log = logging.getLogger(__name__)

_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, ArchitectureAdapter] = weakref.WeakKeyDictionary()


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The model's architecture adapter, built once per model object."""
    if model not in _ADAPTERS:
        _ADAPTERS[model] = ArchitectureAdapter(model)
    return _ADAPTERS[model]


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto", device_map: str | None = None,
               quantization: str | None = None, revision: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a local folder, a folder name under $CNA_MODEL_CACHE, or a hub id; eval mode,
    no gradients. dtype auto is float32 on CPU and bfloat16 on CUDA."""
    folder = Path(name_or_path).expanduser()
    cached = model_cache() / name_or_path
    spec = ModelSpec(name=name_or_path, path=str(folder) if (folder / "config.json").is_file() else None,
                     local_name=name_or_path if (cached / "config.json").is_file() else None, revision=revision,
                     dtype=dtype, device=device, device_map=device_map, quantization=quantization,
                     trust_remote_code=trust_remote_code)
    loaded = load_spec(spec)
    _ADAPTERS[loaded.model] = loaded.adapter
    return loaded.model, loaded.tokenizer


def _statistics(model, tokenizer, *, template: str, batch_size: int, cache_dir: str | Path | None,
                progress: bool, batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET) -> Statistics:
    cache = None
    if cache_dir is not None:
        if getattr(model, "name_or_path", ""):
            cache = StatisticsCache(cache_dir)
        else:  # an in-memory model has no identity that would tell it apart from another on disk
            log.info("cache_dir ignored: the model was not loaded from a folder or the hub")
    return Statistics(model, tokenizer, template=template, cache=cache, batch_size=batch_size,
                      max_batch_tokens=batch_tokens, progress=progress, adapter=adapter_for(model))


def _model_name(model) -> str:
    return getattr(model, "name_or_path", "") or type(model).__name__


def cna_config(*, k_fraction: float | None = 0.001, k: int | None = None, sign: str = "abs", score: str = "delta",
               layers: list | None = None, universal: bool | UniversalConfig = True, position: str = "last",
               **settings) -> CnaConfig:
    """`discover`'s settings as a method config, checked: ConfigError in one line naming the setting."""
    if isinstance(universal, bool):
        universal = UniversalConfig(enabled=universal)
    try:
        config = CnaConfig(k_fraction=None if k is not None else k_fraction, k=k, sign=sign, score=score,
                           layers=layers, universal=universal, position=position, **settings)
    except TypeError as error:  # an unknown keyword
        raise ConfigError(f"discover: {error}") from error
    check_settings(config)
    make_method(config).check()
    return config


def discover(model, tokenizer, positive: Sequence[str], negative: Sequence[str], *, k_fraction: float | None = 0.001,
             k: int | None = None, sign: str = "abs", score: str = "delta", layers: list | None = None,
             universal: bool | UniversalConfig = True, position: str = "last", template: str = "chat",
             batch_size: int = 16, batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET,
             cache_dir: str | Path | None = None, progress: bool = True, **settings) -> Circuit:
    """The CNA circuit: the top neurons by contrastive score between the positive and the negative prompts.

    k is `k_fraction` of all MLP neurons (the paper's 0.1%) or a count `k`; `sign` ranks by |score|, or by one
    sign of it; `score` is delta (the paper), projection, attribution or target; `layers` restricts the search
    ([start, stop) indices or fractions of depth); `universal` drops neurons active on almost any prompt;
    `position` is the token standing for a prompt (last or mean). Further CnaConfig settings (e.g.
    refusal_starts) pass as keywords. Batches hold at most `batch_tokens` padded tokens (bounding memory); with
    `cache_dir`, statistics are cached there (as launch.py's).
    """
    method = make_method(cna_config(k_fraction=k_fraction, k=k, sign=sign, score=score, layers=layers,
                                    universal=universal, position=position, **settings))
    statistics = _statistics(model, tokenizer, template=template, batch_size=batch_size, cache_dir=cache_dir,
                             progress=progress, batch_tokens=batch_tokens)
    return method.discover(statistics, DiscoverySets(list(positive), list(negative)), model_name=_model_name(model))


def _residual(config, model, tokenizer, positive, negative, template, batch_size, cache_dir, progress):
    method = make_method(config)
    check_settings(config)
    statistics = _statistics(model, tokenizer, template=template, batch_size=batch_size, cache_dir=cache_dir,
                             progress=progress)
    return method.discover(statistics, DiscoverySets(list(positive), list(negative)), model_name=_model_name(model))


def caa(model, tokenizer, positive: Sequence[str], negative: Sequence[str], *, layer: int | None = None,
        layer_fraction: float = 0.5, position: str = "last", template: str = "chat", batch_size: int = 16,
        cache_dir: str | Path | None = None, progress: bool = True) -> ResidualDirection:
    """CAA's steering vector: the residual mean difference (positive - negative) after one layer."""
    config = CaaConfig(layer=layer, layer_fraction=layer_fraction, position=position)
    return _residual(config, model, tokenizer, positive, negative, template, batch_size, cache_dir, progress)


def direction(model, tokenizer, positive: Sequence[str], negative: Sequence[str], *, layer: int | None = None,
              layer_fraction: float = 0.5, position: str = "last", template: str = "chat", batch_size: int = 16,
              cache_dir: str | Path | None = None, progress: bool = True) -> ResidualDirection:
    """Directional ablation's direction: the residual mean difference measured at one layer, removed everywhere."""
    config = DirectionConfig(layer=layer, layer_fraction=layer_fraction, position=position)
    return _residual(config, model, tokenizer, positive, negative, template, batch_size, cache_dir, progress)


def intervention_for(model, found: Found, **settings) -> Intervention:
    """The intervention that steers `model` with a circuit or a direction, as the method that found it steers:
    `mode` and `positions` for circuits, `scale` and `positions` for CAA vectors."""
    method = method_types().get(found.method)
    if method is None:
        raise ConfigError(f"steer: a {found.method!r} circuit has no registered method; known: "
                          f"{', '.join(method_types())}")
    names = {f.name for f in dataclasses.fields(method.config_type)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"steer: {', '.join(unknown)} do not apply to {found.method} (it takes "
                          f"{', '.join(sorted(names - {'name'}))})")
    config = method.config_type(name=found.method, **settings)
    check_settings(config)
    return method(config).intervention(adapter_for(model), found)


def steer(model, found: Found | Intervention, alpha: float = 1.0, *, multiplier: float | None = None,
          **settings) -> AbstractContextManager:
    """Context manager: `model` steered by a circuit or direction (or a ready intervention) inside the block.

    alpha = 0 is the unchanged model (bit-identical), 1 full strength; for circuits, `multiplier` m sets the
    neurons to m x (0 ablates, 1 unchanged, > 1 amplifies). Settings: mode (scale | mean) and positions (all |
    prompt | generated) for circuits, scale and positions for CAA vectors. The hooks are removed on leaving the
    block, exception or not.
    """
    intervention = found if isinstance(found, Intervention) else intervention_for(model, found, **settings)
    return intervention.steer(alpha) if multiplier is None else intervention.multiply(multiplier)


def _presentation(tokenizer, system_prompt: str | None, chat_template_kwargs: dict | None, reasoning: str,
                  reasoning_tokens: int) -> dict:
    """Session settings for how prompts are presented and answers read (cna.reasoning)."""
    return {"system_prompt": system_prompt, "template_kwargs": chat_template_kwargs,
            "reasoning": reasoning_format(tokenizer, reasoning), "reasoning_tokens": reasoning_tokens}


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, template: str = "chat",
             batch_size: int = 16, progress: bool = True, system_prompt: str | None = None,
             chat_template_kwargs: dict | None = None, reasoning: str = "auto",
             reasoning_tokens: int = 1024) -> list[str]:
    """Greedy responses, batched (finished rows make room for waiting prompts); under whatever steering is active.

    `system_prompt` and `chat_template_kwargs` (e.g. {"enable_thinking": False}) go to the chat template; a thinking
    model's reasoning block stays in the response, bounded by `reasoning_tokens`, and `max_new_tokens` bounds the
    answer after it (`reasoning`: auto, none, think or harmony)."""
    session = Session(model, tokenizer, template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      progress=progress, **_presentation(tokenizer, system_prompt, chat_template_kwargs, reasoning,
                                                         reasoning_tokens))
    return session.generate(prompts, "generation")


@dataclass
class Results:
    """What `evaluate` measured: one point per strength (as in results.json), every response, seconds per stage."""

    points: list[Point]
    generations: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The points as a text table: alpha, then every field some point has."""
        columns = ["alpha", *dict.fromkeys(k for p in self.points for k, v in p.to_dict().items()
                                            if k != "alpha" and isinstance(v, int | float) and not isinstance(v, bool))]
        rows = [[f"{p.value(c):.4g}" if isinstance(p.value(c), float) else str(p.value(c)) for c in columns]
                for p in self.points]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
        return "\n".join(lines)


def evaluate(model, tokenizer, metrics: Sequence[Metric], alphas: Sequence[float] = (0.0, 1.0),
             intervention: Found | Intervention | None = None, *, multipliers: Sequence[float] | None = None,
             template: str = "chat", max_new_tokens: int = 48, batch_size: int = 16, progress: bool = True,
             system_prompt: str | None = None, chat_template_kwargs: dict | None = None, reasoning: str = "auto",
             reasoning_tokens: int = 1024, **steering) -> Results:
    """Every metric at every strength under the intervention (a circuit, a direction or an Intervention).

    Metrics are objects holding their data, e.g. `cna.Refusal(goals)`, `cna.OverRefusal({"benign": prompts})`,
    `cna.Quality(goals)`, `cna.Mmlu(questions)`, `cna.Kl(harmless)`. With `multipliers`, the points are m values
    (circuits only). `steering` settings go to the intervention as in `steer`; the prompt presentation and reasoning
    settings are `generate`'s. Classifiers and judges read each answer with any reasoning block removed.
    """
    if intervention is not None and not isinstance(intervention, Intervention):
        intervention = intervention_for(model, intervention, **steering)
    session = Session(model, tokenizer, template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      progress=progress, **_presentation(tokenizer, system_prompt, chat_template_kwargs, reasoning,
                                                         reasoning_tokens))
    evaluator = Evaluator(session, list(metrics))
    evaluator.setup()
    strengths = ([(1.0 - m, m) for m in multipliers] if multipliers is not None
                 else [(float(a), None) for a in alphas])
    results = Results([])
    for alpha, multiplier in strengths:
        if intervention is None:
            context = nullcontext()
        else:
            context = intervention.steer(alpha) if multiplier is None else intervention.multiply(multiplier)
        point, records, timings = evaluator.point(alpha, multiplier, context)
        results.points.append(point)
        results.generations += records
        for stage, seconds in timings.items():
            results.timings_s[stage] = round(results.timings_s.get(stage, 0.0) + seconds, 3)
    return results


def export_baked(model, tokenizer, circuit: Circuit, multiplier: float, out_dir: str | Path) -> Path:
    """The model steered by a circuit at `multiplier`, written as an ordinary checkpoint folder (no hooks)."""
    return export_baked_model(model, tokenizer, adapter_for(model), circuit, multiplier, out_dir)


def export_orthogonalised(model, tokenizer, found: ResidualDirection, alpha: float, out_dir: str | Path) -> Path:
    """Directional ablation at `alpha`, written as an ordinary checkpoint with the direction projected out."""
    return export_orthogonalised_model(model, tokenizer, adapter_for(model), found, out_dir, alpha)
