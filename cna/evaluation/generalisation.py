"""Generalisation: refusal on more harmful sets, held out from discovery (`eval.generalisation.<set>`).

These sets measure transfer, so the evaluation side is filtered: their prompts that copy a discovery prompt
(exactly or nearly) are dropped first, and results.json records how many went (`generalisation_removed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cna.data import deduplicate, load_prompts, subsample
from cna.errors import ConfigError
from cna.evaluation.metric import DataContext, EvalSet, Metric, register_metric

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext


@register_metric
class Generalisation(Metric):
    name = "generalisation"
    config_type = dict[str, EvalSet]  # set name -> source and n (null: every prompt left after filtering)
    order = 40
    logged_when = "logged only when eval.generalisation names sets"

    def __init__(self, sets: dict[str, list[str]], removed: dict[str, int] | None = None):
        self.sets = {name: list(prompts) for name, prompts in sets.items()}
        self.removed = dict(removed or {})

    @classmethod
    def from_config(cls, config: dict[str, EvalSet], data: DataContext) -> Generalisation | None:
        sets, removed = {}, {}
        for name, entry in config.items():
            prompts = load_prompts(entry.source)
            kept = deduplicate(prompts, list(data.discovery), data.dedup_threshold).kept
            removed[name] = len(prompts) - len(kept)
            if entry.n is not None and entry.n > len(kept):
                raise ConfigError(f"eval.generalisation.{name}.n: expected at most {len(kept)} (after removing "
                                  f"discovery copies), got {entry.n}")
            sets[name] = subsample(kept, entry.n, data.seed)
        return cls(sets, removed) if sets else None

    def evaluated_sets(self) -> dict[str, list[str]]:
        return dict(self.sets)

    def identity(self) -> dict:
        return {"sets": self.sets}

    def measure(self, point: PointContext) -> dict:
        per_set = {}
        for name, prompts in self.sets.items():
            judged = point.responses(name, prompts)
            per_set[name] = {"rate": judged.refusal.rate, "ci95": list(judged.refusal.ci95), "n": judged.refusal.n,
                             "quality": judged.quality.mean}
        return {"generalisation": per_set}

    def results(self) -> dict:
        return {"generalisation_removed": self.removed}
