"""Measuring strength points: the session a job's metrics share, one point's context, and the evaluator.

`Evaluator.point` runs every steered metric inside the steering context (in the registry's order), then the
metrics that judge the point from outside it (LLM judges), and returns a typed `Point`, its generations.jsonl
records and seconds per stage. It serves `launch.py` jobs and `cna.evaluate` alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from cna.data import encode_prompts
from cna.evaluation.metric import Metric, metric_types
from cna.evaluation.responses import ResponseEvaluation, evaluate_responses
from cna.run_folder import POINT_FIELDS, Point


@dataclass
class Session:
    """The loaded model and the settings every metric measures with, for one job (or one `cna.evaluate` call)."""

    model: Any
    tokenizer: Any
    template: str = "chat"  # chat: each prompt as a user turn of the chat template; raw: the text as it is
    max_new_tokens: int = 48
    batch_size: int = 16
    refill: bool = True
    scoring_batch_tokens: int | None = 1024
    is_refusal: Callable[[str], bool] | None = None  # default: the keyword classifier with its default window
    quality_n: int = 3
    seed: int = 0
    reuse: Any = None  # cna.prefix.LayerPrefixReuse: MMLU and KL run only the layers the intervention changes
    cached: Callable[[str, Callable[[], Any]], Any] = lambda _key, compute: compute()  # unsteered references
    progress: bool = True
    engine: Any = None  # cna.engines.base.Engine that generates and scores (default: transformers on `model`)

    def __post_init__(self):
        if self.engine is None:
            from cna.engines.hf import HfEngine

            self.engine = HfEngine(self.model, self.tokenizer, refill=self.refill)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, self.template)

    def generate(self, prompts: Sequence[str], desc: str) -> list[str]:
        tokens = self.engine.generate(self.encode(prompts), max_new_tokens=self.max_new_tokens,
                                      batch_size=self.batch_size, progress=self.progress, desc=desc)
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], desc: str,
                            token_ids: Sequence[int] | None = None) -> torch.Tensor:
        """log p(next token | prompt) of tokenised prompts through the engine (MMLU, KL), with prefix reuse."""
        return self.engine.next_token_logprobs(prompts, token_ids=token_ids, batch_size=self.batch_size,
                                               max_batch_tokens=self.scoring_batch_tokens, progress=self.progress,
                                               desc=desc, reuse=self.reuse)


class PointContext:
    """One strength point being measured: its responses (generated once per set), records and values so far."""

    def __init__(self, session: Session, alpha: float, multiplier: float | None):
        self.session, self.alpha, self.multiplier = session, alpha, multiplier
        self.values: dict[str, Any] = {}  # the fields measured so far
        self.records: list[dict] = []  # generations.jsonl lines
        self.timings: dict[str, float] = {}
        self._evaluated: dict[str, ResponseEvaluation] = {}

    def responses(self, name: str, prompts: Sequence[str]) -> ResponseEvaluation:
        """The named set's responses at this point, scored for refusal and quality; generated on first use."""
        if name not in self._evaluated:
            responses = self.session.generate(prompts, f"{name} a={self.alpha:g}")
            scoring = {"quality_n": self.session.quality_n}
            if self.session.is_refusal is not None:
                scoring["is_refusal"] = self.session.is_refusal
            evaluated = evaluate_responses(prompts, responses, **scoring)
            self._evaluated[name] = evaluated
            self.records += [{"alpha": self.alpha, "set": name, **record} for record in evaluated.records]
        return self._evaluated[name]

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - started, 3)


class Evaluator:
    """Every metric of a job at one strength, in the registry's order."""

    def __init__(self, session: Session, metrics: Sequence[Metric]):
        order = list(metric_types())
        self.session = session
        self.metrics = sorted(metrics, key=lambda m: order.index(m.name) if m.name in order else len(order))

    def setup(self) -> None:
        """Each metric's work once the model has loaded (unsteered references)."""
        for metric in self.metrics:
            metric.setup(self.session)

    def point(self, alpha: float, multiplier: float | None,
              steering: AbstractContextManager | None = None) -> tuple[Point, list[dict], dict[str, float]]:
        """(the point, its generation records, seconds per stage) with `steering` active for the steered metrics."""
        context = PointContext(self.session, alpha, multiplier)
        with steering or nullcontext():
            self._measure(context, [m for m in self.metrics if m.steered])
        self._measure(context, [m for m in self.metrics if not m.steered])
        values = context.values
        point = Point(alpha=alpha, multiplier=multiplier, **{k: values.pop(k) for k in POINT_FIELDS[2:] if k in values},
                      extra=values)
        return point, context.records, context.timings

    def _measure(self, context: PointContext, metrics: list[Metric]) -> None:
        for metric in metrics:
            with context.timed(metric.stage or metric.name):
                context.values.update(metric.measure(context))

    def results(self) -> dict[str, Any]:
        """The job-level fields every metric adds to results.json."""
        return {key: value for metric in self.metrics for key, value in metric.results().items()}
