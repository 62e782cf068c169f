"""What a report computes from runs: the refusal-vs-KL Pareto front, circuit overlaps, refusal and harmful-compliance
changes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cna.circuit import Circuit, overlap
from cna.evaluation.intervals import difference_interval
from cna.report.runs import Run, is_number
from cna.run_folder import Point

QUALITY_FLOOR = 0.97  # the paper's bar for "output quality kept": hollow markers in refusal_vs_kl fall below it
MISSING = "n/a"


def fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if is_number(value) else MISSING


def fmt_ci(value, ci, spec: str = ".3f") -> str:
    if not is_number(value):
        return MISSING
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(is_number, ci)):
        return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"
    return format(value, spec)


def steered_points(runs: list[Run]) -> list[tuple[Run, Point]]:
    return [(run, point) for run in runs for point in run.points
            if point.alpha and is_number(point.kl_divergence) and is_number(point.refusal_rate)]


def pareto_front(runs: list[Run], quality_floor: float = QUALITY_FLOOR) -> list[tuple[Run, Point]]:
    """The steered points no other point beats on both refusal and KL, among those at quality >= the floor.

    A point is dominated when another has refusal <= and KL <= with one of them strictly lower; the front
    comes back sorted by KL (refusal falling along it).
    """
    feasible = [(run, point) for run, point in steered_points(runs)
                if is_number(point.quality) and point.quality >= quality_floor]

    def dominates(a: Point, b: Point) -> bool:
        return (a.refusal_rate <= b.refusal_rate and a.kl_divergence <= b.kl_divergence
                and (a.refusal_rate < b.refusal_rate or a.kl_divergence < b.kl_divergence))

    front = [(run, point) for run, point in feasible if not any(dominates(other, point) for _, other in feasible)]
    return sorted(front, key=lambda item: (item[1].kl_divergence, item[1].refusal_rate))


def neuron_runs(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.circuit is not None]


def overlap_matrix(circuits: list[Circuit]) -> np.ndarray:
    """|A ∩ B|: the number of shared (layer, index) pairs for every pair of circuits (the diagonal is k)."""
    n = len(circuits)
    matrix = np.zeros((n, n), dtype=int)
    for i in range(n):
        for j in range(i, n):
            matrix[i, j] = matrix[j, i] = len(overlap(circuits[i], circuits[j]))
    return matrix


@dataclass(frozen=True)
class RateChange:
    """One rate of a run at its strongest point against its own unsteered point, with 95% intervals."""

    before: float
    before_ci: tuple[float, float]
    after: float
    after_ci: tuple[float, float]
    change: float
    ci95: tuple[float, float]

    @classmethod
    def between(cls, baseline: Point, steered: Point, rate: str, ci: str) -> RateChange | None:
        values = [(p.value(rate), p.value(ci)) for p in (baseline, steered)]
        if not all(is_number(v) and isinstance(c, (list, tuple)) and len(c) == 2 for v, c in values):
            return None
        (before, before_ci), (after, after_ci) = values
        return cls(before, tuple(before_ci), after, tuple(after_ci), after - before,
                   difference_interval(before, before_ci, after, after_ci))

    def direction(self, fell: str = "fell", rose: str = "rose") -> str:
        if self.ci95[1] < 0:
            return fell
        return rose if self.ci95[0] > 0 else "no significant change"

    def describe(self) -> str:
        return (f"{fmt_ci(self.before, self.before_ci, '.2f')} -> {fmt_ci(self.after, self.after_ci, '.2f')} "
                f"({self.change:+.2f} [{self.ci95[0]:+.2f}, {self.ci95[1]:+.2f}]")


@dataclass(frozen=True)
class RefusalChange:
    """A run's refusal (and harmful compliance, where measured) at its strongest point against its own unsteered
    point (alpha = 0)."""

    run: Run
    baseline: Point
    steered: Point
    change: float
    ci95: tuple[float, float]
    harmful: RateChange | None = None  # harmful compliance (cna.evaluation.compliance), where both points have it

    @property
    def verdict(self) -> str:
        if self.ci95[1] < 0:
            return "reduced"
        return "raised" if self.ci95[0] > 0 else "no significant change"

    def describe(self) -> str:
        before, after = self.baseline, self.steered
        return (f"{fmt_ci(before.refusal_rate, before.refusal_ci95, '.2f')} -> "
                f"{fmt_ci(after.refusal_rate, after.refusal_ci95, '.2f')} at alpha {after.alpha:g}, "
                f"change {self.change:+.2f} [{self.ci95[0]:+.2f}, {self.ci95[1]:+.2f}]")


def refusal_changes(runs: list[Run]) -> list[RefusalChange]:
    """Baseline vs strongest steered point, for every run that has both (and their intervals)."""
    changes = []
    for run in runs:
        points = {p.alpha: p for p in run.points if is_number(p.refusal_rate)}
        steered = [alpha for alpha in points if alpha > 0]
        if 0.0 not in points or not steered:
            continue
        baseline, strongest = points[0.0], points[max(steered)]
        cis = [p.refusal_ci95 for p in (baseline, strongest)]
        if not all(isinstance(ci, (list, tuple)) and len(ci) == 2 for ci in cis):
            continue
        ci95 = difference_interval(baseline.refusal_rate, cis[0], strongest.refusal_rate, cis[1])
        harmful = RateChange.between(baseline, strongest, "harmful_compliance_rate", "harmful_compliance_ci95")
        changes.append(RefusalChange(run, baseline, strongest, strongest.refusal_rate - baseline.refusal_rate, ci95,
                                     harmful))
    return changes


def effect_sentence(changes: list[RefusalChange]) -> str:
    """One sentence with intervals: per run, harmful compliance and refusal together where harmful compliance was
    measured (cna.evaluation.compliance); otherwise which runs reduced refusal and what the others did."""
    if any(c.harmful for c in changes):
        parts = []
        for c in changes:
            harmful = (f"harmful compliance {c.harmful.describe()}, {c.harmful.direction()})" if c.harmful
                       else "harmful compliance n/a")
            parts.append(f"{c.run.display}: {harmful}; refusal {c.describe()} ({c.verdict})")
        return "Harmful compliance and refusal, unsteered -> strongest point: " + "; ".join(parts) + "."
    reduced = [c for c in changes if c.verdict == "reduced"]
    others = [c for c in changes if c.verdict != "reduced"]
    listed_others = "; ".join(f"{c.run.display} ({c.verdict}: {c.describe()})" for c in others)
    if not reduced:
        return f"None of the {len(changes)} run(s) reduced refusal: {listed_others}."
    sentence = "Reduced refusal: " + "; ".join(f"{c.run.display} ({c.describe()})" for c in reduced)
    return sentence + (f"; did not: {listed_others}." if others else ".")


@dataclass(frozen=True)
class BehaviourEffect:
    """One expected effect of a behaviour's steering (results.json `behaviour_effects`), measured on one run."""

    side: str  # remove | induce
    field: str
    expect: str  # decrease | increase
    point: Point
    before: float
    before_ci: list | None
    after: float
    after_ci: list | None

    @property
    def change(self) -> float:
        return self.after - self.before

    @property
    def verdict(self) -> str:
        ci = self.after_ci if isinstance(self.after_ci, (list, tuple)) and len(self.after_ci) == 2 else None
        if ci is None:
            return MISSING
        low, high = ci
        if (high < self.before) if self.expect == "decrease" else (low > self.before):
            return "yes"
        if (low > self.before) if self.expect == "decrease" else (high < self.before):
            return "no"
        return "within noise"


def behaviour_effects(run: Run) -> list[BehaviourEffect]:
    """The run's removal effect at its strongest ablation and induction effect at its strongest amplification."""
    effects = run.results.extra.get("behaviour_effects") or {}
    baseline = next((p for p in run.points if p.alpha == 0.0), None)
    if baseline is None or not isinstance(effects, dict):
        return []
    removals = [p for p in run.points if p.alpha > 0]
    inductions = [p for p in run.points if p.alpha < 0]
    chosen = {"remove": max(removals, key=lambda p: p.alpha) if removals else None,
              "induce": min(inductions, key=lambda p: p.alpha) if inductions else None}
    found = []
    for side, point in chosen.items():
        effect = effects.get(side) or {}
        name = effect.get("field")
        if point is None or not name or not is_number(point.value(name)) or not is_number(baseline.value(name)):
            continue
        ci = {"refusal_rate": "refusal_ci95", "over_refusal_rate": "over_refusal_ci95"}.get(name, f"{name}_ci95")
        found.append(BehaviourEffect(side, name, effect.get("expect", "decrease"), point, baseline.value(name),
                                     baseline.value(ci), point.value(name), point.value(ci)))
    return found
