"""The refusal metric: the share of a harmful set's requests the model declines, by the keyword classifier.

`eval.refusal`: JailbreakBench's 100 harmful goals by default. Every response is generated once per point
(shared with the quality metric and the judge) and classified by `cna.evaluation.keywords`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cna.data import PromptSource, load_prompts
from cna.evaluation.keywords import REFUSAL_PHRASES
from cna.evaluation.metric import DataContext, EvalSet, Field, Metric, evaluation_set, register_metric
from cna.schema import bounded

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext


@dataclass
class RefusalConfig:
    """`eval.refusal`: the harmful set whose refusal rate is the headline number (n: 0 switches it off)."""

    name: str = "jbb_harmful"  # the set's name in generations.jsonl and the report
    source: PromptSource = field(default_factory=PromptSource)
    n: int = bounded(100, 0, integer=True)


@register_metric
class Refusal(Metric):
    name = "refusal"
    config_type = RefusalConfig
    order = 10
    stage = "generation"
    objectives = ("refusal_rate",)
    fields = (Field("refusal_rate", "refusal rate", "refusal_ci95",
                    about="Share of the harmful evaluation prompts refused (keyword classifier), per strength."),
              Field("n_prompts", "n", digits="d", about="Harmful prompts evaluated.", table=False))

    def __init__(self, prompts: list[str], set_name: str = "jbb_harmful"):
        self.prompts, self.set_name = list(prompts), set_name

    @classmethod
    def held_out(cls, config: RefusalConfig) -> list[str]:
        return load_prompts(config.source) if config.n else []

    @classmethod
    def from_config(cls, config: RefusalConfig, data: DataContext) -> Refusal | None:
        prompts = evaluation_set(EvalSet(config.source, config.n), "eval.refusal", data.seed)
        return cls(prompts, config.name) if prompts else None

    def evaluated_sets(self) -> dict[str, list[str]]:
        return {self.set_name: self.prompts}

    def identity(self) -> dict:
        return {"set": self.set_name, "prompts": self.prompts, "phrases": list(REFUSAL_PHRASES)}

    def measure(self, point: PointContext) -> dict:
        refusal = point.responses(self.set_name, self.prompts).refusal
        return {"refusal_rate": refusal.rate, "refusal_ci95": list(refusal.ci95), "n_prompts": refusal.n}
