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

from cna.data import encode_prompts
from cna.evaluation.metric import Metric, metric_types
from cna.evaluation.responses import ResponseEvaluation, evaluate_responses
from cna.generation import eos_token_ids, generate
from cna.reasoning import Generation, ReasoningFormat, generate_with_reasoning
from cna.run_folder import POINT_FIELDS, Point


@dataclass
class Session:
    """The loaded model and the settings every metric measures with, for one job (or one `cna.evaluate` call)."""

    model: Any
    tokenizer: Any
    template: str = "chat"  # chat: each prompt as a user turn of the chat template; raw: the text as it is
    system_prompt: str | None = None  # a system turn before every prompt (chat template only)
    template_kwargs: dict | None = None  # keyword arguments of the chat template, e.g. {"enable_thinking": False}
    reasoning: ReasoningFormat | None = None  # a thinking model's reasoning blocks (cna.reasoning); None: none
    reasoning_tokens: int = 1024  # the most tokens a reasoning block may take before it is closed for the model
    max_new_tokens: int = 48  # of the answer (after any reasoning block)
    batch_size: int = 16
    refill: bool = True
    scoring_batch_tokens: int | None = 1024
    is_refusal: Callable[[str], bool] | None = None  # default: the keyword classifier with its default window
    quality_n: int = 3
    seed: int = 0
    reuse: Any = None  # cna.prefix.LayerPrefixReuse: MMLU and KL run only the layers the intervention changes
    cached: Callable[[str, Callable[[], Any]], Any] = lambda _key, compute: compute()  # unsteered references
    progress: bool = True

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, self.template, system_prompt=self.system_prompt,
                              template_kwargs=self.template_kwargs)

    def generations(self, prompts: Sequence[str], desc: str) -> list[Generation]:
        """Greedy responses with their token ids, a thinking model's reasoning split from its answer."""
        settings = dict(pad_token_id=self.tokenizer.pad_token_id, batch_size=self.batch_size, refill=self.refill,
                        eos_token_id=eos_token_ids(self.model, self.tokenizer), progress=self.progress, desc=desc)
        if self.reasoning is not None:
            return generate_with_reasoning(self.model, self.tokenizer, self.encode(prompts), self.reasoning,
                                           reasoning_tokens=self.reasoning_tokens,
                                           max_new_tokens=self.max_new_tokens, **settings)
        decoded = []
        for tokens in generate(self.model, self.encode(prompts), max_new_tokens=self.max_new_tokens, **settings):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            decoded.append(Generation(tokens, text, tokens, text))
        return decoded

    def generate(self, prompts: Sequence[str], desc: str) -> list[str]:
        """The responses as text (a thinking model's reasoning included)."""
        return [g.response for g in self.generations(prompts, desc)]


class PointContext:
    """One strength point being measured: its responses (generated once per set), records and values so far."""

    def __init__(self, session: Session, alpha: float, multiplier: float | None):
        self.session, self.alpha, self.multiplier = session, alpha, multiplier
        self.values: dict[str, Any] = {}  # the fields measured so far
        self.records: list[dict] = []  # generations.jsonl lines
        self.timings: dict[str, float] = {}
        self._evaluated: dict[str, ResponseEvaluation] = {}
        self._generated: dict[str, list[Generation]] = {}

    def responses(self, name: str, prompts: Sequence[str]) -> ResponseEvaluation:
        """The named set's responses at this point, scored for refusal and quality; generated on first use.

        The classifier and the quality score read each response's answer (a thinking model's reasoning removed);
        the records keep the whole response, and for a thinking model also its answer and reasoning.
        """
        if name not in self._evaluated:
            generated = self.session.generations(prompts, f"{name} a={self.alpha:g}")
            scoring = {"quality_n": self.session.quality_n}
            if self.session.is_refusal is not None:
                scoring["is_refusal"] = self.session.is_refusal
            evaluated = evaluate_responses(prompts, [g.answer for g in generated], **scoring)
            self._evaluated[name], self._generated[name] = evaluated, generated
            for record, generation in zip(evaluated.records, generated, strict=True):
                record["response"] = generation.response
                if self.session.reasoning is not None:
                    record.update(generation.record())
            self.records += [{"alpha": self.alpha, "set": name, **record} for record in evaluated.records]
        return self._evaluated[name]

    def generated(self, name: str) -> list[Generation]:
        """The named set's generations at this point (token ids included); `responses` must have made them."""
        if name not in self._generated:
            raise KeyError(f"no responses of '{name}' at alpha {self.alpha:g} yet")
        return self._generated[name]

    def set_records(self, name: str) -> list[dict]:
        """The generations.jsonl lines of one set at this point (the same objects: a metric may add fields)."""
        return [record for record in self.records if record["set"] == name]

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
