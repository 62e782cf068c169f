"""One job: data -> discovery -> the sweep of strength points -> report, each stage one function and one artifact.

- `prepare_data` reads and checks every prompt set before any model loads: the metrics' evaluation sets and the
  discovery sets, de-duplicated against what the job evaluates (the counts go into circuit.json);
- `discover` loads nothing itself: the method turns cached statistics into a circuit or a direction, written to
  `circuit.json`;
- `sweep` measures every strength point with the job's metrics and rewrites `results.json` (atomically) and
  appends the point's `generations.jsonl` lines after each, so a job killed halfway keeps its finished points
  and a re-run picks up where it stopped; the unsteered point is shared across jobs through the baseline cache;
- `report` draws the job's figures and closes the tracker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from cna.cache import BaselineCache, StatisticsCache
from cna.config import JobConfig
from cna.data import deduplicate, load_prompts, subsample
from cna.engines import engine_types
from cna.engines.base import Engine
from cna.errors import ConfigError
from cna.evaluation.evaluator import Evaluator, Session
from cna.evaluation.keywords import KeywordRefusalClassifier
from cna.evaluation.metric import DataContext, Metric, metric_types
from cna.interventions import Intervention
from cna.io import write_json_atomic
from cna.methods.base import DiscoverySets, Found, Statistics, SteeringMethod
from cna.models import LoadedModel, activation_identity, load_model
from cna.neurons import write_cards
from cna.prefix import PrefixStore, prefix_reuse
from cna.reasoning import reasoning_format
from cna.report import run_plots
from cna.run_folder import (
    CIRCUIT,
    RESULTS,
    JobResults,
    Point,
    append_generations,
    config_sha256,
    keep_finished_generations,
    previous_results,
)
from cna.tracking import Tracker, make_tracker
from cna.validation import validate

log = logging.getLogger(__name__)

BASELINE_FORMAT = 3  # bump when a point's fields change, so cached baselines are recomputed
INFEASIBLE = 1000.0  # added to a search objective whose point misses search.min_quality


# --- data ---------------------------------------------------------------------------------------------------------

@dataclass
class JobData:
    """Every prompt set of a job, read and checked: the discovery sets and the metrics holding theirs."""

    sets: DiscoverySets
    metrics: list[Metric]


def prepare_data(job: JobConfig) -> JobData:
    """Every prompt set the job needs, read (and checked) before any model loads."""
    known, configs, prompts = metric_types(), job.eval.metrics, job.prompts
    # Discovery is de-duplicated against the whole evaluation datasets, not only the sampled prompts.
    held_out = [p for name, config in configs.items() for p in known[name].held_out(config)] if prompts.dedup else []
    discovery, removed = {}, {}
    for side in ("positive", "negative"):
        candidates = load_prompts(getattr(prompts, side))
        if prompts.dedup:
            kept = deduplicate(candidates, held_out, prompts.dedup_threshold)
            removed[side] = kept.removed
            candidates = kept.kept
        if not candidates:
            raise ConfigError(f"prompts.{side}: the prompt set is empty")
        count = getattr(prompts, f"n_{side}")
        if count is not None and count > len(candidates):
            raise ConfigError(f"prompts.n_{side}: expected at most {len(candidates)} (after de-duplication), "
                              f"got {count}")
        discovery[side] = subsample(candidates, count, job.seed)
    context = DataContext(seed=job.seed, discovery=tuple(discovery["positive"] + discovery["negative"]),
                          dedup_threshold=prompts.dedup_threshold)
    metrics = []
    for name in known:  # the registry's order: a metric may read the sets of those built before it
        if name in configs:
            metric = known[name].from_config(configs[name], context)
            if metric is not None:
                metrics.append(metric)
                context.evaluated[name] = metric.evaluated_sets()
    evaluated = {set_name: p for metric in metrics for set_name, p in metric.evaluated_sets().items()}
    overlap = discovery_overlap(list(context.discovery), evaluated, prompts.dedup_threshold)
    sets = DiscoverySets(discovery["positive"], discovery["negative"],
                         {"positive": prompts.positive, "negative": prompts.negative}, removed, overlap)
    return JobData(sets, metrics)


def discovery_overlap(discovery: list[str], evaluated: dict[str, list[str]], threshold: float) -> dict[str, int]:
    """How many discovery prompts are exact or near duplicates of each evaluated set's prompts.

    The same test de-duplication uses, so a de-duplicated job reports 0 everywhere, and an in-sample one
    (discovery on the evaluation goals, as the paper's Table 3) says how far it is in-sample.
    """
    return {name: len(discovery) - len(deduplicate(discovery, prompts, threshold).kept)
            for name, prompts in evaluated.items() if prompts}


# --- discovery ----------------------------------------------------------------------------------------------------

def job_statistics(job: JobConfig, lm: LoadedModel, cache: StatisticsCache) -> Statistics:
    """The loaded model's discovery statistics, batched as the job says and cached under cache_dir."""
    return Statistics(lm.model, lm.tokenizer, template=job.model.template, cache=cache, batch_size=job.batch_size,
                      max_batch_tokens=job.discovery_batch_tokens, adapter=lm.adapter,
                      identity=activation_identity(lm), system_prompt=job.model.system_prompt,
                      template_kwargs=job.model.chat_template_kwargs)


def discover(method: SteeringMethod, statistics: Statistics, sets: DiscoverySets, *, model_name: str,
             run_dir: Path | None = None) -> tuple[Intervention, Found]:
    """Statistics (cached) -> circuit or direction (written to circuit.json) -> the intervention that steers."""
    found = method.discover(statistics, sets, model_name=model_name)
    if run_dir is not None:
        found.save(Path(run_dir) / CIRCUIT)
    return method.intervention(statistics.adapter, found), found


# --- the strength sweep -------------------------------------------------------------------------------------------

def strength_points(job: JobConfig, method: SteeringMethod) -> list[tuple[float, float | None]]:
    """(alpha, multiplier) per point; for neuron methods m = 1 - alpha (so m > 1 has alpha < 0)."""
    if job.sweep.multipliers is not None:
        return [(1.0 - float(m), float(m)) for m in job.sweep.multipliers]
    return [(float(a), 1.0 - float(a) if method.neuron_level else None) for a in job.sweep.alphas]


def baseline_key(job: JobConfig, lm: LoadedModel, metrics: list[Metric], engine: Engine | None = None) -> str:
    """Everything the unsteered point (alpha = 0) depends on, and nothing about the recipe: at m = 1 (alpha = 0)
    every intervention leaves the model bit-identical, so one baseline serves every method and circuit."""
    fields = {
        "format": BASELINE_FORMAT,
        "model": asdict(job.model), "activations": activation_identity(lm),
        "metrics": {metric.name: metric.identity() for metric in metrics},
        "scoring": {"quality_n": job.eval.quality_n, "classifier_window": job.eval.classifier_window},
        "generation": {"max_new_tokens": job.max_new_tokens, "batch_size": job.batch_size},
        "prompt_format": prompt_format(job),
        "scoring_batch_tokens": job.scoring_batch_tokens,  # batches change padding, and float sums in the last bit
        "versions": _versions(),
    }
    if engine is not None and engine.identity():  # the transformers engine's keys stay as they were
        fields["engine"] = engine.identity()
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prompt_format(job: JobConfig) -> dict:
    """How prompts are presented and answers read: part of the baseline key (the statistics key has the tokens)."""
    model = job.model
    return {"template": model.template, "system_prompt": model.system_prompt,
            "chat_template_kwargs": model.chat_template_kwargs, "reasoning": model.reasoning,
            "reasoning_tokens": model.reasoning_tokens}


def search_objectives(results: JobResults, job: JobConfig) -> list[float]:
    """The values a hyper-parameter sweeper minimises, read at the job's strongest point (largest alpha).

    A point whose quality is below search.min_quality is infeasible: every objective gets
    INFEASIBLE x (1 + shortfall) added, so any feasible point dominates it (Hydra's Optuna sweeper
    has no constraint hook).
    """
    search = job.sweep.search
    point = max(results.points, key=lambda p: p.alpha)
    values = [float(point.value(name)) for name in search.objectives]
    floor = search.min_quality
    shortfall = 0.0 if floor is None or point.quality is None else max(0.0, floor - point.quality)
    if shortfall > 0:
        values = [value + INFEASIBLE * (1 + shortfall) for value in values]
    return values


def failed_objectives(count: int) -> list[float]:
    """What a trial with `count` objectives scores when it failed: worse than any trial that ran, penalised or not."""
    return [3 * INFEASIBLE] * count


def session_for(job: JobConfig, lm: LoadedModel, reuse=None, cached=None, engine: Engine | None = None) -> Session:
    """The measuring session of a job: its generation and scoring settings on the loaded model (and engine)."""
    return Session(lm.model, lm.tokenizer, template=job.model.template, system_prompt=job.model.system_prompt,
                   template_kwargs=job.model.chat_template_kwargs,
                   reasoning=reasoning_format(lm.tokenizer, job.model.reasoning),
                   reasoning_tokens=job.model.reasoning_tokens, max_new_tokens=job.max_new_tokens,
                   batch_size=job.batch_size, refill=job.refill_generation,
                   scoring_batch_tokens=job.scoring_batch_tokens,
                   is_refusal=KeywordRefusalClassifier(window=job.eval.classifier_window),
                   quality_n=job.eval.quality_n, seed=job.seed, reuse=reuse,
                   cached=cached or (lambda _key, compute: compute()), engine=engine)


def start_engine(job: JobConfig, lm: LoadedModel) -> Engine:
    """The job's engine (`engine.name`), started once on the loaded model and kept for every point."""
    return engine_types()[job.engine.name].start(job.engine, lm, job)


def sweep(job: JobConfig, lm: LoadedModel, method: SteeringMethod, intervention: Intervention, data: JobData,
          results: JobResults, run_dir: Path, tracker: Tracker, engine: Engine | None = None) -> None:
    """Every strength point not measured yet, each saved (results.json, generations.jsonl, tracker) as it ends."""
    done = {point.alpha for point in results.points}
    cache = job.cache
    engine = engine or start_engine(job, lm)
    intervention = engine.intervention(intervention)
    baselines = BaselineCache(Path(cache.dir) / "baselines" if cache.dir and cache.reuse_baseline else None)
    unsteered = baseline_key(job, lm, data.metrics, engine)
    timings = results.timings_s
    with _timed(timings, "kl_reference"):
        reuse = prefix_reuse(lm.adapter, intervention, memory_mib=cache.prefix_reuse_mib,
                             disk_mib=cache.prefix_reuse_disk_mib,
                             store=prefix_store(job, lm)) if engine.prefix_reuse else None
        evaluator = Evaluator(session_for(job, lm, reuse, lambda key, compute: baselines.tensor(
            f"{unsteered}.{key}", compute), engine), data.metrics)
        evaluator.setup()
    results.extra.update(evaluator.results())
    for alpha, multiplier in strength_points(job, method):
        if alpha in done:
            continue
        cached = baselines.get(unsteered) if alpha == 0.0 else None
        if cached:  # judged already when it was stored: the baseline key covers the judge
            stored, records = cached
            point = Point.from_dict({**stored, "alpha": alpha, "multiplier": multiplier, "reused": True})
            point_timings = {}
            log.info("alpha 0: the unsteered point is reused from the baseline cache")
        else:
            point, records, point_timings = evaluator.point(
                alpha, multiplier, engine.steering(intervention, alpha, multiplier))
            if alpha == 0.0:
                baselines.put(unsteered, point.to_dict(), records)
        for stage, seconds in point_timings.items():
            timings[stage] = round(timings.get(stage, 0.0) + seconds, 3)
        append_generations(run_dir, records)
        results.points.append(point)
        write_json_atomic(run_dir / RESULTS, results.to_dict())
        tracker.log_point(point)
        tracker.log_generations(records)
        log.info("alpha %g: refusal %s, quality %s", alpha, point.refusal_rate, point.quality)
    if reuse is not None:
        results.extra["prefix_reuse"] = {"layer": reuse.layer, "recorded_batches": reuse.recorded_batches,
                                         "batches_from_earlier_jobs": reuse.store.read_batches if reuse.store else 0}


# --- the job ------------------------------------------------------------------------------------------------------

@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - started, 3)


def report(run_dir: Path, results: JobResults, tracker: Tracker) -> None:
    """The job's figures (a plotting problem is a warning, never a failed job), then the tracker's summary."""
    try:
        images = run_plots(run_dir)
    except Exception as error:  # noqa: BLE001 - any matplotlib failure
        log.warning("plots for %s failed: %s", run_dir, error)
        images = {}
    tracker.log_images(images)
    tracker.finish(results)


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def prefix_store(job: JobConfig, lm: LoadedModel) -> PrefixStore | None:
    """Recorded layer prefixes shared by the jobs of a sweep, under cache_dir/prefixes (None: kept per job)."""
    if not job.cache.dir or job.cache.prefix_cache_mib <= 0:
        return None
    return PrefixStore(Path(job.cache.dir) / "prefixes", {**activation_identity(lm), "versions": _versions()},
                       job.cache.prefix_cache_mib)


def run(job: JobConfig, run_dir: str | Path, *, group: str | None = None) -> JobResults:
    """Run one job into `run_dir` and return its results (the content of results.json)."""
    run_dir = Path(run_dir)
    method = validate(job)
    sha = config_sha256(job.settings)
    previous = previous_results(run_dir, sha) if job.resume else None
    if previous and previous.complete:
        log.info("%s is complete for this config: skipped", run_dir / RESULTS)
        return previous
    timings: dict[str, float] = dict(previous.timings_s) if previous else {}
    with _timed(timings, "data"):
        data = prepare_data(job)
    with _timed(timings, "load_model"):
        lm = load_model(job.model.spec())
    cache = StatisticsCache(job.cache.dir)
    statistics = job_statistics(job, lm, cache)
    with _timed(timings, "discovery"):
        intervention, found = discover(method, statistics, data.sets, model_name=job.model.name, run_dir=run_dir)
    with _timed(timings, "neuron_cards"):
        page = method.neuron_cards(statistics, data.sets, found)  # None: the method writes none
    if page is not None:
        write_cards(run_dir, *page)
    with _timed(timings, "load_engine"):
        engine = start_engine(job, lm)
    done = list(previous.points) if previous else []
    finished_records = keep_finished_generations(run_dir, {point.alpha for point in done})
    behaviour = job.behaviour
    results = JobResults(job.model.name, job.method.name, points=done, timings_s=timings, extra={
        "behaviour": behaviour.name, "behaviour_metric": behaviour.metric,
        "behaviour_effects": {"remove": dataclasses.asdict(behaviour.remove),
                              "induce": dataclasses.asdict(behaviour.induce)},
        "config_sha256": sha, "in_sample": data.sets.in_sample, "discovery_overlap": data.sets.overlap,
        "cache": {"hits": cache.hits, "misses": cache.misses}})
    tracker = make_tracker(job.logger, run_dir=run_dir, group=group, model=job.model.name, method=job.method.name,
                           config=job.settings, behaviour=behaviour.name)
    try:
        tracker.log_circuit(run_dir / CIRCUIT)
        tracker.log_neurons([card.table_row() for card in page[0]] if page is not None else [])
        for point in done:
            tracker.log_point(point)
        tracker.log_generations(finished_records)
        sweep(job, lm, method, intervention, data, results, run_dir, tracker, engine)
        results.status = "complete"
        write_json_atomic(run_dir / RESULTS, results.to_dict())
        report(run_dir, results, tracker)
    except BaseException:
        tracker.finish(results, failed=True)
        raise
    finally:
        engine.close()
    return results
