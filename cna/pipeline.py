"""One job: config -> data -> model -> statistics -> circuit -> steered evaluation -> files and W&B.

Each stage returns a plain value; the run folder receives `circuit.json`, then
after every strength point `results.json` (rewritten atomically) and the
point's lines of `generations.jsonl`, so a job killed halfway keeps its finished
points and a re-run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from cna.attribution import GRADIENT_SCORES, GradientStatistics, collect_gradients, score_metric, score_neurons
from cna.cache import BaselineCache, StatisticsCache, statistics_key
from cna.circuit import Circuit, ExpertChoice, ResidualDirection
from cna.config import NEURON_METHODS, validate
from cna.data import (
    PromptSource,
    deduplicate,
    encode_prompts,
    load_prompts,
    packaged_prompts,
    prompt_sets_sha256,
    subsample,
)
from cna.discovery import (
    ActivationStatistics,
    collect_statistics,
    layer_at_fraction,
    random_circuit,
    residual_direction,
    resolve_layer_range,
    select_circuit,
    select_experts,
    universal_neurons,
)
from cna.errors import ConfigError
from cna.evaluation.judges import Judge, describe, judge_point, make_judge
from cna.evaluation.kl import kl_divergence
from cna.evaluation.mmlu import MmluQuestion, evaluate_mmlu, load_mmlu_folder, stratified_sample
from cna.evaluation.refusal import REFUSAL_PHRASES, KeywordRefusalClassifier, refusal_rate
from cna.evaluation.responses import evaluate_responses
from cna.evaluation.scoring import next_token_logprobs
from cna.generation import eos_token_ids, generate
from cna.interventions import DirectionAblation, Intervention, NeuronScale, RouterBias, SteeringVector, baked_weights
from cna.models import LoadedModel, ModelSpec, activation_identity, is_offloaded, is_quantized_module, load_model
from cna.prefix import LayerPrefixReuse, PrefixStore, prefix_reuse
from cna.report import run_plots
from cna.run_folder import (
    CIRCUIT,
    RESULTS,
    append_generations,
    config_sha256,
    keep_finished_generations,
    previous_results,
    write_json_atomic,
)
from cna.tracking import Tracker, make_tracker

log = logging.getLogger(__name__)

BASELINE_FORMAT = 1  # bump when a point's fields change, so cached baselines are recomputed
INFEASIBLE = 1000.0  # added to a search objective whose point misses search.min_quality


# --- data -------------------------------------------------------------------------------------------------------

@dataclass
class JobData:
    positive: list[str]
    negative: list[str]
    refusal: list[str]
    over_refusal: dict[str, list[str]]
    kl: list[str]
    mmlu: list[MmluQuestion]
    removed_duplicates: dict[str, int] = field(default_factory=dict)
    overlap: dict[str, int] = field(default_factory=dict)  # discovery prompts found in each evaluated set
    generalisation: dict[str, list[str]] = field(default_factory=dict)  # more harmful sets, held out from discovery
    generalisation_removed: dict[str, int] = field(default_factory=dict)  # their prompts dropped as discovery copies

    @property
    def in_sample(self) -> bool:
        """Discovery shares prompts with what the job evaluates (the paper's Table 3 setting)."""
        return any(self.overlap.values())


def _source(node) -> PromptSource:
    return PromptSource(**OmegaConf.to_container(node, resolve=True))


def _evaluation_set(node, key: str, seed: int) -> list[str]:
    if not node.n:
        return []
    prompts = load_prompts(_source(node.source))
    if not prompts:
        origin = node.source.get("path") or node.source.get("hub") or node.source.get("packaged")
        raise ConfigError(f"{key}.source: '{origin}' has no rows (expected at least {key}.n = {node.n})")
    if node.n > len(prompts):
        raise ConfigError(f"{key}.n: expected at most {len(prompts)} (the dataset's size), got {node.n}")
    return subsample(prompts, node.n, seed)


def load_job_data(cfg: DictConfig) -> JobData:
    """Every prompt set the job needs, read (and checked) before any model loads."""
    evaluation = cfg.eval
    refusal = _evaluation_set(evaluation.refusal, "eval.refusal", cfg.seed)
    over_refusal = {name: _evaluation_set(node, f"eval.over_refusal.{name}", cfg.seed)
                    for name, node in (evaluation.over_refusal or {}).items()}
    kl = _evaluation_set(evaluation.kl, "eval.kl", cfg.seed)
    mmlu: list[MmluQuestion] = []
    if evaluation.mmlu.n:
        mmlu = stratified_sample(load_mmlu_folder(evaluation.mmlu.folder, "test"), evaluation.mmlu.n, cfg.seed)
    sets, removed = {}, {}
    for side in ("positive", "negative"):
        prompts = load_prompts(_source(cfg.prompts[side]))
        if cfg.prompts.dedup:
            # Against the whole evaluation datasets, not only the sampled prompts.
            held_out = load_prompts(_source(evaluation.refusal.source)) if evaluation.refusal.n else []
            for node in (evaluation.over_refusal or {}).values():
                held_out += load_prompts(_source(node.source)) if node.n else []
            kept = deduplicate(prompts, held_out, cfg.prompts.dedup_threshold)
            removed[side] = kept.removed
            prompts = kept.kept
        if not prompts:
            raise ConfigError(f"prompts.{side}: the prompt set is empty")
        count = cfg.prompts[f"n_{side}"]
        if count is not None and count > len(prompts):
            raise ConfigError(f"prompts.n_{side}: expected at most {len(prompts)} (after de-duplication), got {count}")
        sets[side] = subsample(prompts, count, cfg.seed)
    discovery = sets["positive"] + sets["negative"]
    generalisation, generalisation_removed = {}, {}
    for name, node in (evaluation.get("generalisation") or {}).items():
        # These sets measure transfer, so the evaluation side is filtered: prompts that copy a discovery prompt go.
        prompts = load_prompts(_source(node.source))
        kept = deduplicate(prompts, discovery, cfg.prompts.dedup_threshold).kept
        generalisation_removed[name] = len(prompts) - len(kept)
        if node.n is not None and node.n > len(kept):
            raise ConfigError(f"eval.generalisation.{name}.n: expected at most {len(kept)} (after removing "
                              f"discovery copies), got {node.n}")
        generalisation[name] = subsample(kept, node.n, cfg.seed)
    evaluated = {evaluation.refusal.name: refusal, **over_refusal, **generalisation, "kl": kl}
    overlap = discovery_overlap(discovery, evaluated, cfg.prompts.dedup_threshold)
    return JobData(sets["positive"], sets["negative"], refusal, over_refusal, kl, mmlu, removed, overlap,
                   generalisation, generalisation_removed)


def discovery_overlap(discovery: list[str], evaluated: dict[str, list[str]], threshold: float) -> dict[str, int]:
    """How many discovery prompts are exact or near duplicates of each evaluated set's prompts.

    The same test de-duplication uses, so a de-duplicated job reports 0 everywhere, and an in-sample one
    (discovery on the evaluation goals, as the paper's Table 3) says how far it is in-sample.
    """
    return {name: len(discovery) - len(deduplicate(discovery, prompts, threshold).kept)
            for name, prompts in evaluated.items() if prompts}


# --- discovery and method ---------------------------------------------------------------------------------------

@dataclass
class Discovery:
    positive: ActivationStatistics
    negative: ActivationStatistics
    diverse: ActivationStatistics | None
    gradients: GradientStatistics | None = None  # the positive set's, for method.score attribution or target


def _neuron_site(lm: LoadedModel) -> str:
    return f"{lm.adapter.model_type}:{lm.adapter.family.neuron_site}"


def _prompt_statistics(cfg: DictConfig, lm: LoadedModel, cache: StatisticsCache, prompts: list[str], desc: str,
                       top_fraction: float | None = None) -> ActivationStatistics:
    encoded = encode_prompts(lm.tokenizer, prompts, cfg.model.template)
    key = statistics_key(model=activation_identity(lm), site=_neuron_site(lm), prompts=encoded,
                         position=cfg.method.position, top_fraction=top_fraction)
    return cache.get_or_compute(key, lambda: collect_statistics(
        lm.adapter, encoded, pad_token_id=lm.tokenizer.pad_token_id, batch_size=cfg.batch_size,
        max_batch_tokens=cfg.discovery_batch_tokens, position=cfg.method.position, top_fraction=top_fraction,
        desc=desc))


def universal_statistics(cfg: DictConfig, lm: LoadedModel, cache: StatisticsCache) -> ActivationStatistics | None:
    """The diverse prompts' statistics behind the universal-neuron filter (paper section 3.2), or None when the
    method applies no filter. They depend on the model alone, so one cached computation serves every job."""
    method = cfg.method
    if method.name not in NEURON_METHODS or not method.universal.enabled:
        return None
    return _prompt_statistics(cfg, lm, cache, packaged_prompts("diverse"), "diverse", method.universal.top_fraction)


def discover(cfg: DictConfig, lm: LoadedModel, data: JobData, cache: StatisticsCache) -> Discovery:
    template, method = cfg.model.template, cfg.method
    neuron_method = method.name in NEURON_METHODS
    diverse = universal_statistics(cfg, lm, cache)
    gradients = None
    if neuron_method and method.score in GRADIENT_SCORES:
        sources = {side: _source(cfg.prompts[side]) for side in ("positive", "negative")}
        metric, metric_id = score_metric(method.score, lm.tokenizer, refusal_starts=list(method.refusal_starts),
                                         positive=data.positive, negative=data.negative, sources=sources)
        encoded = encode_prompts(lm.tokenizer, data.positive, template)
        key = statistics_key(model=activation_identity(lm), site=_neuron_site(lm), prompts=encoded,
                             position=method.position, top_fraction=None, score=metric_id)
        gradients = cache.get_or_compute(key, lambda: collect_gradients(
            lm.adapter, encoded, metric, pad_token_id=lm.tokenizer.pad_token_id, batch_size=cfg.batch_size,
            max_batch_tokens=cfg.discovery_batch_tokens, desc=method.score), load=GradientStatistics.load)
    return Discovery(_prompt_statistics(cfg, lm, cache, data.positive, "positive"),
                     _prompt_statistics(cfg, lm, cache, data.negative, "negative"), diverse, gradients)


def build_method(cfg: DictConfig, lm: LoadedModel, found: Discovery, data: JobData,
                 model_name: str) -> tuple[Intervention, Circuit | ResidualDirection | ExpertChoice]:
    method, adapter = cfg.method, lm.adapter
    prompts = {"positive": len(data.positive), "negative": len(data.negative),
               "sha256": prompt_sets_sha256(data.positive, data.negative),
               "duplicates_removed": data.removed_duplicates,
               "in_sample": data.in_sample, "overlap": data.overlap}
    if method.name in NEURON_METHODS:
        direction_layer = (method.direction_layer if method.direction_layer is not None
                           else layer_at_fraction(adapter.n_layers, method.direction_layer_fraction))
        scores = score_neurons(method.score, found.positive, found.negative, adapter, direction_layer=direction_layer,
                               gradients=found.gradients)
        universal = None if found.diverse is None else universal_neurons(found.diverse, method.universal.threshold)
        requested = OmegaConf.to_object(method.layers) if method.layers is not None else None
        circuit = select_circuit(
            scores, model=model_name, k_fraction=method.k_fraction, k=method.k, sign=method.sign,
            layers=resolve_layer_range(requested, adapter.n_layers), universal=universal, prompts=prompts,
            settings={"position": method.position, "mode": method.mode, "layers_requested": requested,
                      "score": method.score,
                      **({"direction_layer": direction_layer} if method.score == "projection" else {}),
                      **({"refusal_starts": list(method.refusal_starts)} if method.score == "attribution" else {}),
                      "universal_threshold": method.universal.threshold if universal is not None else None,
                      "universal_top_fraction": method.universal.top_fraction if universal is not None else None},
        )
        if method.name == "random":
            circuit = random_circuit(circuit, scores, method.seed)
        return NeuronScale(adapter, circuit, mode=method.mode, positions=method.positions), circuit
    if method.name == "router":  # mixtures of experts (issue 27): shift chosen experts' gate logits
        requested = OmegaConf.to_object(method.layers) if method.layers is not None else None
        choice = select_experts(found.positive, found.negative, model=model_name, n_experts=method.n_experts,
                                sign=method.sign, scale=method.scale,
                                layers=resolve_layer_range(requested, adapter.n_layers), prompts=prompts,
                                settings={"position": method.position, "layers_requested": requested})
        return RouterBias(adapter, choice, positions=method.positions), choice
    layer = method.layer if method.layer is not None else layer_at_fraction(adapter.n_layers, method.layer_fraction)
    if not 0 <= layer < adapter.n_layers:
        raise ConfigError(f"method.layer: expected a layer in [0, {adapter.n_layers}), got {layer}")
    edited = [layer] if method.name == "caa" else list(range(adapter.n_layers))
    settings = {"position": method.position, **({"scale": method.scale} if method.name == "caa" else {})}
    direction = residual_direction(found.positive, found.negative, model=model_name, method=method.name,
                                   source_layer=layer, layers=edited, prompts=prompts, settings=settings)
    if method.name == "caa":
        return SteeringVector(adapter, direction, scale=method.scale, positions=method.positions), direction
    return DirectionAblation(adapter, direction, positions=method.positions), direction


def discover_method(cfg: DictConfig, lm: LoadedModel, data: JobData,
                    cache: StatisticsCache) -> tuple[Intervention, Circuit | ResidualDirection | ExpertChoice]:
    """Statistics (cached) -> circuit or direction: the one discovery path of launch.py and `python -m cna discover`."""
    return build_method(cfg, lm, discover(cfg, lm, data, cache), data, cfg.model.name)


def model_spec(cfg: DictConfig) -> ModelSpec:
    return ModelSpec(**{k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "template"})


# --- the strength sweep -----------------------------------------------------------------------------------------

def strength_points(cfg: DictConfig) -> list[tuple[float, float | None]]:
    """(alpha, multiplier) per point; for neuron methods m = 1 - alpha (so m > 1 has alpha < 0)."""
    if cfg.multipliers is not None:
        return [(1.0 - float(m), float(m)) for m in cfg.multipliers]
    neuron = cfg.method.name in NEURON_METHODS
    return [(float(a), 1.0 - float(a) if neuron else None) for a in cfg.alphas]


@contextmanager
def _steered(intervention: Intervention, alpha: float, multiplier: float | None, bake: bool = False):
    """The model steered at this point: by hooks, or with `bake` (CNA in scale mode at every position) by the
    circuit's multipliers written into its weights, restored on leaving."""
    if bake and bakeable(intervention):
        m = 1.0 - alpha if multiplier is None else multiplier
        with baked_weights(intervention.adapter, intervention.circuit, m):
            yield
    elif multiplier is not None and isinstance(intervention, NeuronScale):
        with intervention.multiply(multiplier):
            yield
    else:
        with intervention.steer(alpha):
            yield


class Evaluator:
    """Everything measured at one strength, under whatever intervention is active."""

    def __init__(self, cfg: DictConfig, lm: LoadedModel, data: JobData,
                 cached: Callable[[Callable[[], torch.Tensor]], torch.Tensor] = lambda compute: compute(),
                 reuse: LayerPrefixReuse | None = None):
        """`cached` wraps the unsteered KL reference computation (e.g. with the baseline cache); with `reuse`,
        MMLU and KL run the layers below the intervention's lowest one once per prompt set."""
        self.cfg, self.lm, self.data, self.reuse = cfg, lm, data, reuse
        tokenizer = lm.tokenizer
        self.encode = lambda prompts: encode_prompts(tokenizer, prompts, cfg.model.template)
        self.greedy = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(lm.model, tokenizer),
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           refill=cfg.refill_generation)
        self.classifier = KeywordRefusalClassifier(window=cfg.eval.classifier_window)
        self.kl_prompts = self.encode(data.kl) if data.kl else []
        self.unsteered_logprobs = cached(self._kl_logprobs) if data.kl else None
        judge = cfg.eval.get("judge")
        self.judge_settings = (OmegaConf.to_container(judge, resolve=True)
                               if judge is not None and judge.name != "none" else None)
        self._judge: Judge | None = None  # loaded at its first use, so its load time counts as judging

    @property
    def judge_description(self) -> dict | None:
        return describe(self.judge_settings) if self.judge_settings else None

    def judge(self, point: dict, records: list[dict]) -> dict[str, float]:
        """Add the LLM judge's verdicts to a point and its records; call it outside any steering context.

        (The hf judge is its own model object in any case, so a steering hook could not reach it.)
        Returns seconds per stage.
        """
        timings: dict[str, float] = {}
        if self.judge_settings is None:
            return timings
        with _timed(timings, "judge"):
            if self._judge is None:
                self._judge = make_judge(self.judge_settings)
            judge_point(self._judge, point, records)
        return timings

    def _kl_logprobs(self):
        return next_token_logprobs(self.lm.model, self.kl_prompts, pad_token_id=self.lm.tokenizer.pad_token_id,
                                   batch_size=self.cfg.batch_size, max_batch_tokens=self.cfg.scoring_batch_tokens,
                                   desc="kl", reuse=self.reuse)

    def _responses(self, prompts: list[str], desc: str) -> list[str]:
        tokens = generate(self.lm.model, self.encode(prompts), desc=desc, **self.greedy)
        return [self.lm.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def _refusal_per_set(self, sets: dict[str, list[str]], alpha: float) -> tuple[dict[str, dict], list[dict]]:
        """Refusal rate and quality of each named prompt set, and the sets' generation records."""
        per_set, records = {}, []
        for name, prompts in sets.items():
            if not prompts:
                continue
            judged = evaluate_responses(prompts, self._responses(prompts, f"{name} a={alpha:g}"),
                                        is_refusal=self.classifier, quality_n=self.cfg.eval.quality_n)
            per_set[name] = {"rate": judged.refusal.rate, "ci95": list(judged.refusal.ci95), "n": judged.refusal.n,
                             "quality": judged.quality.mean}
            records += [{"alpha": alpha, "set": name, **r} for r in judged.records]
        return per_set, records

    def point(self, alpha: float, multiplier: float | None) -> tuple[dict, list[dict], dict[str, float]]:
        """(results point, generation records, seconds per stage)."""
        timings: dict[str, float] = {}
        point: dict = {"alpha": alpha, "multiplier": multiplier}
        records: list[dict] = []
        point.update(dict.fromkeys(("refusal_rate", "refusal_ci95", "quality", "quality_ci95", "degenerate_rate")),
                     n_prompts=0)
        if self.data.refusal:  # off (n: 0) where a job measures only other sets, e.g. experiment=generalisation
            with _timed(timings, "generation"):
                refusal = evaluate_responses(self.data.refusal, self._responses(self.data.refusal,
                                                                                f"refusal a={alpha:g}"),
                                             is_refusal=self.classifier, quality_n=self.cfg.eval.quality_n)
            point.update(refusal_rate=refusal.refusal.rate, refusal_ci95=list(refusal.refusal.ci95),
                         quality=refusal.quality.mean, quality_ci95=list(refusal.quality.ci95),
                         degenerate_rate=refusal.quality.degenerate_rate, n_prompts=refusal.refusal.n)
            records += [{"alpha": alpha, "set": self.cfg.eval.refusal.name, **r} for r in refusal.records]
        with _timed(timings, "over_refusal"):
            per_set, set_records = self._refusal_per_set(self.data.over_refusal, alpha)
        flags = [r["refused"] for r in set_records]
        records += set_records
        pooled = refusal_rate(flags) if flags else None
        point.update(over_refusal_rate=pooled.rate if pooled else None,
                     over_refusal_ci95=list(pooled.ci95) if pooled else None, over_refusal=per_set)
        if self.data.generalisation:
            with _timed(timings, "generalisation"):
                point["generalisation"], set_records = self._refusal_per_set(self.data.generalisation, alpha)
            records += set_records
        with _timed(timings, "mmlu"):
            mmlu = evaluate_mmlu(self.lm.model, self.lm.tokenizer, self.data.mmlu, k_shot=self.cfg.eval.mmlu.k_shot,
                                 batch_size=self.cfg.batch_size, max_batch_tokens=self.cfg.scoring_batch_tokens,
                                 reuse=self.reuse) if self.data.mmlu else None
        point.update(mmlu_accuracy=mmlu.accuracy if mmlu else None, mmlu_ci95=list(mmlu.ci95) if mmlu else None)
        with _timed(timings, "kl"):
            if not self.kl_prompts:
                kl = None
            elif alpha == 0.0:  # the unsteered model itself (alpha 0 is bit-identical): no forward needed
                kl = 0.0
            else:
                kl = kl_divergence(self._kl_logprobs(), self.unsteered_logprobs, self.cfg.eval.kl.direction)
        point["kl_divergence"] = kl
        return point, records, timings


def search_objectives(results: dict, search: DictConfig) -> list[float]:
    """The values a hyper-parameter sweeper minimises, read at the job's strongest point (largest alpha).

    A point whose quality is below search.min_quality is infeasible: every objective gets
    INFEASIBLE x (1 + shortfall) added, so any feasible point dominates it (Hydra's Optuna sweeper
    has no constraint hook).
    """
    point = max(results["points"], key=lambda p: p["alpha"])
    values = [float(point[name]) for name in search.objectives]
    floor = search.get("min_quality")
    shortfall = 0.0 if floor is None or point["quality"] is None else max(0.0, floor - point["quality"])
    if shortfall > 0:
        values = [value + INFEASIBLE * (1 + shortfall) for value in values]
    return values


def failed_objectives(search: DictConfig) -> list[float]:
    """What a trial that failed scores: worse than any trial that ran, penalised or not."""
    return [3 * INFEASIBLE] * len(search.objectives)


def bakeable(intervention: Intervention) -> bool:
    """Weights can carry it: neuron scaling toward 0 (not a mean), at every position, in the circuit's layers held
    at full precision."""
    if not (isinstance(intervention, NeuronScale) and intervention.mode == "scale" and intervention.positions == "all"):
        return False
    sites = [intervention.adapter.neuron_sites[layer] for layer in intervention.circuit.by_layer()]
    return not any(is_quantized_module(site) or is_offloaded(site) for site in sites)


# --- the job ----------------------------------------------------------------------------------------------------

@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - started, 3)


def _plots(run_dir: Path) -> dict[str, Path]:
    """The job's figures; a plotting problem is a warning, never a failed job."""
    try:
        return run_plots(run_dir)
    except Exception as error:  # noqa: BLE001 - any matplotlib failure
        log.warning("plots for %s failed: %s", run_dir, error)
        return {}


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def prefix_store(cfg: DictConfig, lm: LoadedModel) -> PrefixStore | None:
    """Recorded layer prefixes shared by the jobs of a sweep, under cache_dir/prefixes (None: kept per job)."""
    if not cfg.cache_dir or cfg.prefix_cache_mib <= 0:
        return None
    return PrefixStore(Path(cfg.cache_dir) / "prefixes", {**activation_identity(lm), "versions": _versions()},
                       cfg.prefix_cache_mib)


def baseline_key(cfg: DictConfig, lm: LoadedModel, data: JobData) -> str:
    """Everything the unsteered point (alpha = 0) depends on, and nothing about the recipe: at m = 1 (alpha = 0)
    every intervention leaves the model bit-identical, so one baseline serves every method and circuit."""
    fields = {
        "format": BASELINE_FORMAT,
        "model": OmegaConf.to_container(cfg.model, resolve=True), "activations": activation_identity(lm),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "prompts": {"refusal": data.refusal, "over_refusal": data.over_refusal, "kl": data.kl,
                    "generalisation": data.generalisation, "mmlu": [asdict(question) for question in data.mmlu]},
        "generation": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        "scoring_batch_tokens": cfg.scoring_batch_tokens,  # batches change padding, and float sums in the last bit
        "refusal_phrases": list(REFUSAL_PHRASES),
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def run(cfg: DictConfig, run_dir: str | Path, *, group: str | None = None) -> dict:
    """Run one job into `run_dir` and return its results (the content of results.json)."""
    run_dir = Path(run_dir)
    validate(cfg)
    sha = config_sha256(cfg)
    previous = previous_results(run_dir, sha) if cfg.resume else None
    if previous and previous.get("status") == "complete":
        log.info("%s is complete for this config: skipped", run_dir / RESULTS)
        return previous
    timings: dict[str, float] = dict(previous["timings_s"]) if previous else {}
    with _timed(timings, "data"):
        data = load_job_data(cfg)
    model_name = cfg.model.name
    with _timed(timings, "load_model"):
        lm = load_model(model_spec(cfg))
    cache = StatisticsCache(cfg.cache_dir)
    with _timed(timings, "discovery"):
        intervention, artifact = discover_method(cfg, lm, data, cache)
    artifact.save(run_dir / CIRCUIT)
    done = {p["alpha"]: p for p in previous["points"]} if previous else {}
    finished_records = keep_finished_generations(run_dir, set(done))
    results = {"model": model_name, "method": cfg.method.name, "status": "running", "config_sha256": sha,
               "in_sample": data.in_sample, "discovery_overlap": data.overlap,
               **({"kl_direction": cfg.eval.kl.direction} if data.kl else {}),  # kl_divergence is KL(first || second)
               **({"generalisation_removed": data.generalisation_removed} if data.generalisation else {}),
               "points": list(done.values()), "timings_s": timings,
               "cache": {"hits": cache.hits, "misses": cache.misses}}
    baselines = BaselineCache(Path(cfg.cache_dir) / "baselines" if cfg.cache_dir and cfg.reuse_baseline else None)
    tracker: Tracker = make_tracker(cfg, run_dir=run_dir, group=group)
    try:
        tracker.log_circuit(run_dir / CIRCUIT)
        tracker.log_generations(finished_records)
        unsteered = baseline_key(cfg, lm, data)
        with _timed(timings, "kl_reference"):
            reuse = prefix_reuse(lm.adapter, intervention, memory_mib=cfg.prefix_reuse_mib,
                                 disk_mib=cfg.prefix_reuse_disk_mib, store=prefix_store(cfg, lm))
            evaluator = Evaluator(cfg, lm, data, lambda compute: baselines.tensor(f"{unsteered}.kl", compute), reuse)
        if evaluator.judge_description:
            results["judge"] = evaluator.judge_description
        for alpha, multiplier in strength_points(cfg):
            if alpha in done:
                tracker.log_point(done[alpha])
                continue
            key = unsteered if alpha == 0.0 else None
            cached = baselines.get(key) if key else None
            if cached:  # judged already when it was stored: the baseline key covers eval.judge
                point, records = cached
                point, point_timings = {**point, "alpha": alpha, "multiplier": multiplier, "reused": True}, {}
                log.info("alpha 0: the unsteered point is reused from the baseline cache")
            else:
                with _steered(intervention, alpha, multiplier, cfg.bake_steering):
                    point, records, point_timings = evaluator.point(alpha, multiplier)
                point_timings.update(evaluator.judge(point, records))  # unsteered
                if key:
                    baselines.put(key, point, records)
            for stage, seconds in point_timings.items():
                timings[stage] = round(timings.get(stage, 0.0) + seconds, 3)
            append_generations(run_dir, records)
            results["points"].append(point)
            write_json_atomic(run_dir / RESULTS, results)
            tracker.log_point(point)
            tracker.log_generations(records)
            log.info("alpha %g: refusal %s, quality %s", alpha, point["refusal_rate"], point["quality"])
        if reuse is not None:
            results["prefix_reuse"] = {"layer": reuse.layer, "recorded_batches": reuse.recorded_batches,
                                       "batches_from_earlier_jobs": reuse.store.read_batches if reuse.store else 0}
        results["status"] = "complete"
        write_json_atomic(run_dir / RESULTS, results)
        tracker.log_images(_plots(run_dir))
        tracker.finish(results)
    except BaseException:
        tracker.finish(results, failed=True)
        raise
    return results
