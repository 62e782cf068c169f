"""Over-refusal: the share of requests that should be answered which the model declines, per set and pooled.

`eval.over_refusal.<set>`: JBB's 100 benign twins of the harmful goals and XSTest's 250 safe prompts that look
unsafe by default. Steering that removes refusal must not raise this; steering that adds it is measured here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cna.data import load_prompts
from cna.evaluation.keywords import refusal_rate
from cna.evaluation.metric import DataContext, EvalSet, Field, Metric, evaluation_set, register_metric

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext


@register_metric
class OverRefusal(Metric):
    name = "over_refusal"
    config_type = dict[str, EvalSet]  # set name -> where it comes from and how many prompts (n: 0 leaves it out)
    order = 30
    objectives = ("over_refusal_rate",)
    history_keys = ("over_refusal/jbb_benign", "over_refusal/xstest_safe")  # the default sets, per set
    fields = (Field("over_refusal_rate", "over-refusal", "over_refusal_ci95",
                    about="Refusal rate on benign requests, pooled over the sets: what steering must not raise."),)

    def __init__(self, sets: dict[str, list[str]]):
        self.sets = {name: list(prompts) for name, prompts in sets.items() if prompts}

    @classmethod
    def held_out(cls, config: dict[str, EvalSet]) -> list[str]:
        return [prompt for entry in config.values() if entry.n for prompt in load_prompts(entry.source)]

    @classmethod
    def from_config(cls, config: dict[str, EvalSet], data: DataContext) -> OverRefusal | None:
        sets = {name: evaluation_set(entry, f"eval.over_refusal.{name}", data.seed) for name, entry in config.items()}
        metric = cls(sets)
        return metric if metric.sets else None

    def evaluated_sets(self) -> dict[str, list[str]]:
        return dict(self.sets)

    def identity(self) -> dict:
        return {"sets": self.sets}

    def measure(self, point: PointContext) -> dict:
        per_set, flags = {}, []
        for name, prompts in self.sets.items():
            judged = point.responses(name, prompts)
            per_set[name] = {"rate": judged.refusal.rate, "ci95": list(judged.refusal.ci95), "n": judged.refusal.n,
                             "quality": judged.quality.mean}
            flags += [record["refused"] for record in judged.records]
        pooled = refusal_rate(flags)
        return {"over_refusal_rate": pooled.rate, "over_refusal_ci95": list(pooled.ci95), "over_refusal": per_set}
