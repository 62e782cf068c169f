"""The comparison dashboard as data: every panel, and every metric it reads, named as the tracker logs it.

A key names a value and where W&B keeps it: `history` (one value per strength point, against alpha; the
names of `cna.tracking.point_metrics`, i.e. the results.json point fields), `summary` (a run's final values:
its last point, plus the generations tables) or `config` (a dotted path into the job's Hydra config).
`dashboard_spec()` builds the spec from the metric and method registries: one panel per metric against alpha,
one colour per method. `missing_keys` checks the keys against what runs really logged, so a metric renamed in
the contract breaks a test rather than a dashboard. Keys a default job does not log are the spec's
`optional` ones, with the condition under which they appear (a metric's `logged_when`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cna.errors import ConfigError
from cna.evaluation.metric import metric_types
from cna.methods import method_types
from cna.tracking import FULL_STRENGTH_TABLE, NEURON_TABLE, OfflineRun

SOURCES = ("history", "summary", "config")


@dataclass(frozen=True)
class Key:
    source: str  # history | summary | config
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def history(name: str) -> Key:
    return Key("history", name)


def summary(name: str) -> Key:
    return Key("summary", name)


def config(name: str) -> Key:
    return Key("config", name)


@dataclass(frozen=True)
class Panel:
    """kind: `line` (y against alpha, one line per group), `scatter` (x, y: one point per run), `parallel`
    (one axis per key, one line per run), `table` (a summary table), `images` (logged plots)."""

    kind: str
    title: str
    keys: tuple[Key, ...]
    about: str

    def __post_init__(self) -> None:
        arity = {"scatter": 2, "table": 1}.get(self.kind)
        if self.kind not in ("line", "scatter", "parallel", "table", "images"):
            raise ConfigError(f"panel {self.title!r}: kind: expected line, scatter, parallel, table or images, "
                              f"got {self.kind!r}")
        if (arity is not None and len(self.keys) != arity) or not self.keys:
            raise ConfigError(f"panel {self.title!r}: expected {arity or 'at least 1'} keys, got {len(self.keys)}")


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class DashboardSpec:
    x_axis: Key  # the step metric of every line panel
    group_by: tuple[Key, ...]  # runs are grouped (and coloured) by these, outermost first
    group_colours: Mapping[str, str]  # first grouping level (the method) -> colour
    sections: tuple[Section, ...]
    optional: Mapping[Key, str] = field(default_factory=dict)  # key -> when it is logged
    max_runs: int = 100  # runs per panel (W&B's default of 10 would cut a k x sign x threshold sweep short)

    def panels(self) -> Iterator[Panel]:
        for section in self.sections:
            yield from section.panels

    def used_keys(self) -> list[Key]:
        """Every key the dashboard reads, once, in order of first use."""
        used = [self.x_axis, *self.group_by, *(key for panel in self.panels() for key in panel.keys)]
        return list(dict.fromkeys(used))

    def validate(self) -> None:
        """Sources are known and every optional key is one a panel reads (so the optional list cannot go stale)."""
        used = set(self.used_keys())
        for key in [*used, *self.optional]:
            if key.source not in SOURCES:
                raise ConfigError(f"dashboard key {key}: source: expected one of {', '.join(SOURCES)}")
        unused = sorted(str(key) for key in self.optional if key not in used)
        if unused:
            raise ConfigError(f"dashboard optional keys read by no panel: {', '.join(unused)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "x_axis": str(self.x_axis),
            "group_by": [str(key) for key in self.group_by],
            "group_colours": dict(self.group_colours),
            "sections": [{"name": section.name,
                          "panels": [{**asdict(panel), "keys": [str(key) for key in panel.keys]}
                                     for panel in section.panels]}
                         for section in self.sections],
            "optional": {str(key): when for key, when in self.optional.items()},
            "max_runs": self.max_runs,
        }


_STRONGEST = "each run's last strength point (its summary; alpha = 1 in the default sweep)"


# The first panel: what a response to a harmful request did, refused or complied with substance, side by side.
LEAD = Panel("line", "Harmful compliance and refusal",
             (history("harmful_compliance_rate"), history("refusal_rate"), history("empty_compliance_rate")),
             "Per strength: the share of harmful requests answered with substance (harmful compliance), refused "
             "(keyword classifier) and answered without substance (empty compliance); they add up to 1.")


def _metric_panels() -> tuple[tuple[Panel, ...], dict[Key, str]]:
    """The lead panel, then one line panel per registered metric with fields (its fields and their extra history
    keys) that the lead panel does not already show, and the keys of metrics a default job does not run, with
    when they are logged."""
    panels, optional = [LEAD], {}
    for metric in metric_types().values():
        if not metric.fields:
            continue
        keys = tuple(history(f.name) for f in metric.fields) + tuple(history(k) for k in metric.history_keys)
        if metric.logged_when:
            optional.update(dict.fromkeys(keys, metric.logged_when))
        if all(key in LEAD.keys for key in keys):
            continue
        about = " ".join(f.about for f in metric.fields if f.about)
        panels.append(Panel("line", " and ".join(f.label for f in metric.fields), keys, about))
    return tuple(panels), optional


def dashboard_spec() -> DashboardSpec:
    """The comparison dashboard over the metrics and methods registered now (plug-ins included)."""
    panels, optional = _metric_panels()
    judge = metric_types()["judge"].logged_when
    optional[summary("judge_refusal_rate")] = judge
    optional[summary("harmful_compliance_rate")] = metric_types()["compliance"].logged_when
    return DashboardSpec(
        x_axis=history("alpha"),
        group_by=(config("method.name"), config("model.name"), config("behaviour.name")),
        group_colours={name: method.colour for name, method in method_types().items()},
        sections=(
            Section("Against alpha, by method and model", panels),
            Section("Across runs", (
                Panel("scatter", "Harmful compliance vs refusal, coloured by method",
                      (summary("refusal_rate"), summary("harmful_compliance_rate")),
                      f"One point per run at {_STRONGEST}: how much of what refusal lost became substance."),
                Panel("scatter", "Refusal vs KL, coloured by method",
                      (summary("kl_divergence"), summary("refusal_rate")),
                      f"One point per run at {_STRONGEST}: lower-left is the better trade-off."),
                Panel("scatter", "Judge refusal vs KL, coloured by method",
                      (summary("kl_divergence"), summary("judge_refusal_rate")),
                      f"The same with the LLM judge's refusal rate, at {_STRONGEST}."),
            )),
            Section("Recipe sweep: k fraction x sign x threshold x score", (
                Panel("parallel", "Selection knobs against the outcome",
                      (config("method.k_fraction"), config("method.sign"), config("method.universal.threshold"),
                       config("method.score"), summary("refusal_rate"), summary("kl_divergence"),
                       summary("quality")),
                      f"One line per run from its selection settings to its refusal, KL and quality at {_STRONGEST}."),
            )),
            Section("Generations at alpha = 1", (
                Panel("table", "Every response at full strength", (summary(FULL_STRENGTH_TABLE),),
                      "The generations table's rows at alpha = 1 (prompt, set, response, refused, quality, the "
                      "three-way compliance verdict) per run."),
            )),
            Section("Circuit", (
                Panel("images", "Neurons per layer", (history("plots/layer_histogram"),),
                      "The layer histogram of each neuron circuit (cna and random runs)."),
                Panel("table", "Neuron cards", (summary(NEURON_TABLE),),
                      "One row per circuit neuron (neurons.md in the run folder): rank, score, delta, selection "
                      "frequency, the tokens its output weight promotes and suppresses, its most and least "
                      "activating discovery prompts, its estimated effect on the behaviour metric."),
            )),
        ),
        optional=optional,
    )


# --- checking the keys against logged runs ----------------------------------------------------------------------

def _dotted(prefix: str, value: Any) -> Iterator[str]:
    if prefix:
        yield prefix
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _dotted(f"{prefix}.{key}" if prefix else str(key), item)


def logged_keys(runs: Iterable[OfflineRun]) -> set[Key]:
    """Every key that at least one of the runs logged: history columns, summary entries, config paths."""
    logged: set[Key] = set()
    for run in runs:
        logged.update(history(name) for row in run.history for name in row)
        logged.update(summary(name) for name in run.summary)
        logged.update(config(name) for name in _dotted("", run.config))
    return logged


def missing_keys(runs: Iterable[OfflineRun], spec: DashboardSpec | None = None) -> list[str]:
    """The keys the dashboard reads that none of the runs logged, less the declared optional ones."""
    spec = spec or dashboard_spec()
    spec.validate()
    logged = logged_keys(runs)
    return [str(key) for key in spec.used_keys() if key not in logged and key not in spec.optional]
