"""Plots and a summary page from one run folder or a tree of them (a Hydra `outputs/` or `multirun/` folder).

    python -m cna.report DIR [--out OUT]

A run folder is any folder holding a `results.json` (see the output contract in DESIGN.md); its `circuit.json`
and `.hydra/overrides.yaml` are read when present. Figures are drawn on `matplotlib.figure.Figure` objects with
the Agg canvas, never through pyplot: no display, no global figure registry to leak, safe inside a pipeline job.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cna.circuit import Circuit, Neuron, localisation, overlap
from cna.errors import CnaError
from cna.evaluation.intervals import difference_interval

RESULTS, CIRCUIT, OVERRIDES = "results.json", "circuit.json", Path(".hydra") / "overrides.yaml"
DPI = 110
# Override keys that never tell two runs apart in a label: model and method are in the label already.
_LABEL_EXCLUDED_KEYS = {"model", "method", "resume", "logger"}
_MARKERS = {"cna": "o", "caa": "s", "direction": "^", "random": "x"}
_MISSING = "n/a"

FIGURES = ("refusal_quality_vs_alpha", "mmlu_vs_alpha", "kl_vs_alpha", "over_refusal_vs_alpha", "refusal_vs_kl",
           "layer_histogram", "circuit_overlap", "judge_vs_keyword")
QUALITY_FLOOR = 0.97  # the paper's bar for "output quality kept": hollow markers in refusal_vs_kl fall below it


class NoRunsError(CnaError):
    """The folder holds no results.json at any depth."""


# --- reading run folders ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run folder: its results, its circuit (neuron circuit or residual direction) and its Hydra overrides."""

    path: Path
    results: dict
    circuit: Circuit | None = None  # neuron circuits (cna, random)
    direction: dict | None = None  # circuit.json of a residual-direction method (caa, direction), vector dropped
    overrides: list[str] = field(default_factory=list)
    label: str = ""  # "model-short-name/method", plus " [suffix]" where that alone is not unique
    suffix: str = ""

    @property
    def model(self) -> str:
        return str(self.results.get("model", "?"))

    @property
    def short_model(self) -> str:
        return self.model.rstrip("/").rsplit("/", 1)[-1]

    @property
    def method(self) -> str:
        return str(self.results.get("method", "?"))

    @property
    def status(self) -> str:
        return str(self.results.get("status", "unknown"))

    @property
    def complete(self) -> bool:
        return self.results.get("status") == "complete"

    @property
    def display(self) -> str:
        """The label, marked when the run did not finish."""
        return self.label if self.complete else f"{self.label} (incomplete)"

    @property
    def two_line_display(self) -> str:
        """The display label broken before its suffix, for titles and tick labels."""
        base = f"{self.short_model}/{self.method}"
        second = " ".join(filter(None, [f"[{_short(self.suffix, 40)}]" if self.suffix else "",
                                        "" if self.complete else "(incomplete)"]))
        return f"{base}\n{second}" if second else base

    @property
    def points(self) -> list[dict]:
        points = [p for p in self.results.get("points") or [] if isinstance(p, dict) and _number(p.get("alpha"))]
        return sorted(points, key=lambda p: p["alpha"])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _circuit_from_dict(data: dict) -> Circuit:
    """A Circuit from circuit.json, tolerating files that carry only the contract's neuron fields."""
    neurons = [Neuron(int(n["layer"]), int(n["index"]), float(n.get("delta", 0.0)),
                      float(n.get("positive_mean", 0.0)), float(n.get("negative_mean", 0.0)))
               for n in data["neurons"]]
    n_layers = data.get("n_layers")
    if n_layers is None:
        n_layers = max((n.layer for n in neurons), default=-1) + 1
    return Circuit(model=str(data.get("model", "?")), method=str(data.get("method", "?")), neurons=neurons,
                   n_layers=int(n_layers), neurons_per_layer=int(data.get("neurons_per_layer", 0)),
                   k_fraction=float(data.get("k_fraction", 0.0)),
                   universal_removed=int(data.get("universal_removed", 0)),
                   prompts=data.get("prompts", {}), settings=data.get("settings", {}))


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / OVERRIDES
    if not path.is_file():
        return []
    try:
        import yaml

        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # a broken overrides file only costs the label its suffix
        return []
    return [str(item) for item in items] if isinstance(items, list) else []


def load_run(run_dir: Path) -> Run:
    """Read one run folder; raises ValueError when results.json is not a JSON object."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ValueError(f"{run_dir / RESULTS}: expected a JSON object")
    run = Run(run_dir, results, overrides=_read_overrides(run_dir))
    circuit_path = run_dir / CIRCUIT
    if circuit_path.is_file():
        try:
            data = json.loads(circuit_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("neurons"), list):
            try:
                run.circuit = _circuit_from_dict(data)
            except (KeyError, TypeError, ValueError):
                run.circuit = None
        elif isinstance(data, dict):
            run.direction = {k: v for k, v in data.items() if k != "vector"}
    return run


def find_runs(folder: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """All run folders under `folder` (itself included), labelled; and the results.json files that could not be read.

    Raises NoRunsError when there is no results.json at any depth.
    """
    folder = Path(folder)
    paths = sorted(folder.rglob(RESULTS)) if folder.is_dir() else []
    if not paths:
        raise NoRunsError(f"no {RESULTS} in {folder} or any folder below it")
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(load_run(path.parent))
        except (OSError, ValueError) as error:
            skipped.append((path, str(error).splitlines()[0] if str(error) else type(error).__name__))
    runs.sort(key=lambda r: (r.short_model, r.method, str(r.path)))
    assign_labels(runs, folder)
    return runs, skipped


def _override_items(overrides: Iterable[str]) -> list[str]:
    items = []
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key not in _LABEL_EXCLUDED_KEYS:
            items.append(item.lstrip("+~"))
    return items


def assign_labels(runs: list[Run], root: Path) -> None:
    """`model-short-name/method`, and where several runs share that: the overrides that differ, else the folder."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        run.label, run.suffix = f"{run.short_model}/{run.method}", ""
        groups[run.label].append(run)
    for base, members in groups.items():
        if len(members) == 1:
            continue
        settings = [dict(item.split("=", 1) if "=" in item else (item, "") for item in _override_items(run.overrides))
                    for run in members]
        keys = sorted({key for s in settings for key in s if len({s.get(key) for s in settings}) > 1})
        suffixes = [",".join(f"{key}={s.get(key, 'default')}" for key in keys) for s in settings]
        if not keys or len(set(suffixes)) < len(suffixes):
            suffixes = _distinct_folders([run.path for run in members], root)
        for run, suffix in zip(members, suffixes, strict=True):
            run.label, run.suffix = f"{base} [{suffix}]", suffix


def _distinct_folders(paths: list[Path], root: Path) -> list[str]:
    """The folders relative to `root`, less the leading parts that they all share."""
    parts = [Path(_folder_name(path, root)).parts for path in paths]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def _folder_name(path: Path, root: Path) -> str:
    try:
        relative = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        relative = Path(path.name)
    return str(relative) if str(relative) != "." else path.name


# --- figures ----------------------------------------------------------------------------------------------------

def _colours(runs: list[Run]) -> dict[int, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {id(run): cmap(i % cmap.N) for i, run in enumerate(runs)}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.clear()  # figures made without pyplot are not registered anywhere: clearing frees them at once
    return path


def _series(run: Run, key: str, ci_key: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(alpha, value, [lo, hi] or None) over the points that have `key`."""
    xs, ys, cis = [], [], []
    for point in run.points:
        value = point.get(key)
        if not _number(value):
            continue
        xs.append(point["alpha"])
        ys.append(value)
        ci = point.get(ci_key) if ci_key else None
        cis.append(ci if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_number, ci)) else (value, value))
    has_ci = ci_key is not None and any(point.get(ci_key) for point in run.points if _number(point.get(key)))
    return np.asarray(xs, float), np.asarray(ys, float), (np.asarray(cis, float) if has_ci and cis else None)


def _plot_metric(ax, runs: list[Run], colours: dict, key: str, ci_key: str | None) -> int:
    """One line per run with its CI as a shaded band; returns how many runs had the metric."""
    drawn = 0
    for run in runs:
        x, y, ci = _series(run, key, ci_key)
        if not len(x):
            continue
        colour = colours[id(run)]
        ax.plot(x, y, marker=_MARKERS.get(run.method, "D"), markersize=4, linewidth=1.6, color=colour,
                linestyle="-" if run.complete else "--", label=run.display)
        if ci is not None:
            ax.fill_between(x, ci[:, 0], ci[:, 1], color=colour, alpha=0.15, linewidth=0)
        drawn += 1
    ax.set_xlabel("alpha (0 = unsteered, 1 = full strength)")
    ax.grid(True, alpha=0.3)
    return drawn


def _legend(fig: Figure, axes) -> None:
    handles, labels = [], []
    for ax in np.atleast_1d(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        # Say once what every label shares (the model), and drop the "method." of override keys, so that the
        # settings that tell runs apart survive the cut to legend width.
        models = {label.split("/", 1)[0] for label in labels}
        shared = f"{models.pop()}/" if len(models) == 1 and len(labels) > 1 else ""
        texts = [_short(label.removeprefix(shared).replace("method.", "")) for label in labels]
        fig.legend(handles, texts, loc="outside lower center", fontsize=8, frameon=False,
                   ncol=2 if len(handles) > 3 else len(handles), title=shared.rstrip("/") or None,
                   title_fontsize=8)


def _short(label: str, width: int = 60) -> str:
    """A label cut in the middle so that a figure's legend or tick never outgrows its axes."""
    if len(label) <= width:
        return label
    keep = (width - 1) // 2
    return f"{label[:keep]}…{label[-(width - 1 - keep):]}"


def _any(runs: list[Run], key: str) -> bool:
    return any(_number(point.get(key)) for run in runs for point in run.points)


def plot_refusal_quality(runs: list[Run], path: Path) -> Path:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    refusal_ax, quality_ax = fig.subplots(1, 2)
    colours = _colours(runs)
    drawn = _plot_metric(refusal_ax, runs, colours, "refusal_rate", "refusal_ci95")
    _plot_metric(quality_ax, runs, colours, "quality", "quality_ci95")
    refusal_ax.set(title="Refusal rate (95% CI)", ylabel="refusal rate", ylim=(-0.03, 1.03))
    quality_ax.set(title="Output quality (1 - repeated n-grams)", ylabel="quality", ylim=(-0.03, 1.03))
    if not drawn:
        refusal_ax.text(0.5, 0.5, "no finished points yet", ha="center", va="center", transform=refusal_ax.transAxes)
    _legend(fig, [refusal_ax, quality_ax])
    return _save(fig, path)


def plot_judge_vs_keyword(runs: list[Run], path: Path) -> Path:
    """Keyword and judge refusal side by side, and the judge's score (0 refused or useless .. 1 full help)."""
    fig = Figure(figsize=(15, 3.8), layout="constrained")
    keyword_ax, judge_ax, score_ax = fig.subplots(1, 3, sharey=True)
    colours = _colours(runs)
    _plot_metric(keyword_ax, runs, colours, "refusal_rate", "refusal_ci95")
    _plot_metric(judge_ax, runs, colours, "judge_refusal_rate", "judge_refusal_ci95")
    _plot_metric(score_ax, runs, colours, "judge_score", "judge_score_ci95")
    keyword_ax.set(title="Refusal, keyword classifier (95% CI)", ylabel="rate", ylim=(-0.03, 1.03))
    judge_ax.set(title="Refusal, LLM judge (95% CI)")
    score_ax.set(title="Judge score: 0 refused/useless .. 1 full help")
    _legend(fig, [keyword_ax, judge_ax, score_ax])
    return _save(fig, path)


def plot_single_metric(runs: list[Run], path: Path, key: str, ci_key: str | None, title: str, ylabel: str,
                       unit_range: bool = True, reference: float | None = None) -> Path:
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1)
    _plot_metric(ax, runs, _colours(runs), key, ci_key)
    ax.set(title=title, ylabel=ylabel)
    if unit_range:
        ax.set_ylim(-0.03, 1.03)
    _legend(fig, ax)
    return _save(fig, path)


def _steered_points(runs: list[Run]) -> list[tuple[Run, dict]]:
    return [(run, point) for run in runs for point in run.points
            if point.get("alpha") and _number(point.get("kl_divergence")) and _number(point.get("refusal_rate"))]


def pareto_front(runs: list[Run], quality_floor: float = QUALITY_FLOOR) -> list[tuple[Run, dict]]:
    """The steered points no other point beats on both refusal and KL, among those at quality >= the floor.

    A point is dominated when another has refusal <= and KL <= with one of them strictly lower; the front
    comes back sorted by KL (refusal falling along it).
    """
    feasible = [(run, point) for run, point in _steered_points(runs)
                if _number(point.get("quality")) and point["quality"] >= quality_floor]

    def dominates(a: dict, b: dict) -> bool:
        return (a["refusal_rate"] <= b["refusal_rate"] and a["kl_divergence"] <= b["kl_divergence"]
                and (a["refusal_rate"] < b["refusal_rate"] or a["kl_divergence"] < b["kl_divergence"]))

    front = [(run, point) for run, point in feasible if not any(dominates(other, point) for _, other in feasible)]
    return sorted(front, key=lambda item: (item[1]["kl_divergence"], item[1]["refusal_rate"]))


def plot_refusal_vs_kl(runs: list[Run], path: Path) -> Path:
    """The trade-off a recipe search optimises: every steered point's refusal (95% CI) against its KL,
    with the Pareto front of the points at quality >= QUALITY_FLOOR as a dashed staircase."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    colours = _colours(runs)
    front = pareto_front(runs)
    if len(front) >= 2:
        ax.step([p["kl_divergence"] for _, p in front], [p["refusal_rate"] for _, p in front], where="post",
                color="0.4", linestyle="--", linewidth=1, label=f"Pareto front (quality >= {QUALITY_FLOOR})")
    for run, point in _steered_points(runs):
        colour = colours[id(run)]
        ci = point.get("refusal_ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_number, ci)):
            ax.errorbar(point["kl_divergence"], point["refusal_rate"], color=colour, linewidth=0.8,
                        yerr=[[point["refusal_rate"] - ci[0]], [ci[1] - point["refusal_rate"]]])
        kept = _number(point.get("quality")) and point["quality"] >= QUALITY_FLOOR
        ax.plot(point["kl_divergence"], point["refusal_rate"], marker=_MARKERS.get(run.method, "D"), markersize=7,
                color=colour, markerfacecolor=colour if kept else "white", linestyle="none",
                label=run.display if len(run.points) == 1 else f"{run.display} a={point['alpha']:g}")
    ax.set(title=f"Refusal vs KL at each steered point (hollow: quality < {QUALITY_FLOOR})",
           xlabel="KL(steered || unsteered), next token (nats)", ylabel="refusal rate", ylim=(-0.03, 1.03))
    ax.grid(True, alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def neuron_runs(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.circuit is not None]


def plot_layer_histogram(runs: list[Run], path: Path) -> Path:
    """Neurons per layer, one subplot per neuron circuit."""
    circuits = neuron_runs(runs)
    ncols = min(3, len(circuits))
    nrows = math.ceil(len(circuits) / ncols)
    fig = Figure(figsize=(4.3 * ncols, 2.9 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, run in zip(axes, circuits, strict=False):
        circuit = run.circuit
        counts = circuit.layer_counts
        layers = np.arange(circuit.n_layers)
        ax.bar(layers, [counts.get(int(layer), 0) for layer in layers], color="#3b6ea5", width=0.8)
        ax.set_xlim(-0.7, max(circuit.n_layers, 1) - 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(12, max(circuit.n_layers, 1))))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{run.two_line_display}  k={circuit.k}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("neurons")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[len(circuits):]:
        ax.set_visible(False)
    return _save(fig, path)


def overlap_matrix(circuits: list[Circuit]) -> np.ndarray:
    """|A ∩ B|: the number of shared (layer, index) pairs for every pair of circuits (the diagonal is k)."""
    n = len(circuits)
    matrix = np.zeros((n, n), dtype=int)
    for i in range(n):
        for j in range(i, n):
            matrix[i, j] = matrix[j, i] = len(overlap(circuits[i], circuits[j]))
    return matrix


def plot_circuit_overlap(runs: list[Run], path: Path) -> Path:
    circuits = neuron_runs(runs)
    matrix = overlap_matrix([run.circuit for run in circuits])
    n = len(circuits)
    side = max(4.0, 0.75 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    labels = [run.two_line_display for run in circuits]
    ax.set_xticks(range(n), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    threshold = matrix.max() / 2 if matrix.max() else 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9 if n <= 8 else 7,
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set_title("Shared neurons |A ∩ B| (layer, index); diagonal = k", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def draw_figures(runs: list[Run], out: Path) -> dict[str, Path]:
    """Every figure that the runs have data for, written into `out`; returns {figure name: path}."""
    out = Path(out)
    written: dict[str, Path] = {}

    def figure(name: str, draw: Callable[[Path], Path]) -> None:
        written[name] = draw(out / f"{name}.png")

    figure("refusal_quality_vs_alpha", lambda p: plot_refusal_quality(runs, p))
    if _any(runs, "mmlu_accuracy"):
        figure("mmlu_vs_alpha", lambda p: plot_single_metric(runs, p, "mmlu_accuracy", "mmlu_ci95",
                                                             "MMLU accuracy (95% CI); dotted: chance", "accuracy",
                                                             reference=0.25))
    if _any(runs, "kl_divergence"):
        figure("kl_vs_alpha", lambda p: plot_single_metric(runs, p, "kl_divergence", None,
                                                           "KL(steered || unsteered), next token", "KL (nats)",
                                                           unit_range=False))
    if _any(runs, "over_refusal_rate"):
        figure("over_refusal_vs_alpha", lambda p: plot_single_metric(runs, p, "over_refusal_rate", "over_refusal_ci95",
                                                                     "Over-refusal on benign prompts (95% CI)",
                                                                     "refusal rate"))
    if _any(runs, "judge_refusal_rate"):
        figure("judge_vs_keyword", lambda p: plot_judge_vs_keyword(runs, p))
    if len(_steered_points(runs)) >= 2:
        figure("refusal_vs_kl", lambda p: plot_refusal_vs_kl(runs, p))
    if neuron_runs(runs):
        figure("layer_histogram", lambda p: plot_layer_histogram(runs, p))
    if len(neuron_runs(runs)) >= 2:
        figure("circuit_overlap", lambda p: plot_circuit_overlap(runs, p))
    return written


# --- summary.md -------------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if _number(value) else _MISSING


def _fmt_ci(value, ci, spec: str = ".3f") -> str:
    if not _number(value):
        return _MISSING
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_number, ci)):
        return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"
    return format(value, spec)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def point_row(run: Run, point: dict) -> list[str]:
    """One summary table row: how every number of a point is printed."""
    return [
        run.display, run.short_model, run.method, _fmt(point.get("alpha"), "g"), _fmt(point.get("multiplier"), "g"),
        _fmt_ci(point.get("refusal_rate"), point.get("refusal_ci95")), _fmt(point.get("quality")),
        _fmt(point.get("degenerate_rate")), _fmt_ci(point.get("mmlu_accuracy"), point.get("mmlu_ci95")),
        _fmt(point.get("kl_divergence"), ".4g"),
        _fmt_ci(point.get("over_refusal_rate"), point.get("over_refusal_ci95")),
        str(point.get("n_prompts", _MISSING)),
    ]


_TABLE_HEADER = ["run", "model", "method", "alpha", "m", "refusal rate [95% CI]", "quality", "degenerate",
                 "MMLU [95% CI]", "KL", "over-refusal [95% CI]", "n"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _circuit_section(run: Run) -> list[str]:
    circuit = run.circuit
    lines = [f"### {run.display}", ""]
    k_fraction = f" ({circuit.k_fraction:.4%} of all MLP neurons)" if circuit.k_fraction else ""
    lines.append(f"- k = {circuit.k}{k_fraction}, {circuit.n_layers} layers"
                 + (f" x {circuit.neurons_per_layer} neurons" if circuit.neurons_per_layer else "")
                 + (f", universal neurons removed: {circuit.universal_removed}" if circuit.universal_removed else ""))
    counts = {layer: c for layer, c in sorted(circuit.layer_counts.items()) if c}
    lines.append("- neurons per layer (non-zero): " + (", ".join(f"L{layer}: {c}" for layer, c in counts.items())
                                                        or "none"))
    if circuit.neurons:
        where = localisation(circuit)
        lines.append(f"- localisation of the top {where['n']} by |delta|: {where['final_3_layers']:.1%} in the final "
                     f"3 layers, {where['final_quarter']:.1%} in the final quarter "
                     f"(layers {where['final_quarter_start_layer']}-{circuit.n_layers - 1})")
    return lines + [""]


def _overlap_section(runs: list[Run]) -> list[str]:
    """Shared (layer, neuron) pairs for every pair of circuits, as a count and a share of the smaller circuit."""
    matrix = overlap_matrix([run.circuit for run in runs])
    rows = []
    for i, j in itertools.combinations(range(len(runs)), 2):
        smaller = min(runs[i].circuit.k, runs[j].circuit.k)
        rows.append([runs[i].display, runs[j].display, f"{int(matrix[i, j])} / {smaller}",
                     f"{matrix[i, j] / smaller:.1%}" if smaller else _MISSING])
    return ["## Circuit overlap", ""] + _table(["circuit", "circuit", "shared neurons", "share"], rows) + [""]


def _direction_line(run: Run) -> str:
    data = run.direction or {}
    layers = data.get("layers") or []
    edited = (f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers") if layers else "?"
    return (f"- {run.display}: mean difference at layer {data.get('source_layer', '?')}, edits {edited}, "
            f"|v| = {_fmt(data.get('vector_norm'), '.4g')}")


def _in_sample_text(run: Run) -> str:
    """'no', 'yes (set: n, ...)', or n/a for results written before the overlap was recorded."""
    if "in_sample" not in run.results:
        return _MISSING
    overlap = {name: n for name, n in (run.results.get("discovery_overlap") or {}).items() if n}
    return "yes (" + ", ".join(f"{name}: {n}" for name, n in overlap.items()) + ")" if overlap else "no"


@dataclass(frozen=True)
class RefusalChange:
    """A run's refusal at its strongest point against its own unsteered point (alpha = 0)."""

    run: Run
    baseline: dict
    steered: dict
    change: float
    ci95: tuple[float, float]

    @property
    def verdict(self) -> str:
        if self.ci95[1] < 0:
            return "reduced"
        return "raised" if self.ci95[0] > 0 else "no significant change"

    def describe(self) -> str:
        before, after = self.baseline, self.steered
        return (f"{_fmt_ci(before['refusal_rate'], before.get('refusal_ci95'), '.2f')} -> "
                f"{_fmt_ci(after['refusal_rate'], after.get('refusal_ci95'), '.2f')} at alpha {after['alpha']:g}, "
                f"change {self.change:+.2f} [{self.ci95[0]:+.2f}, {self.ci95[1]:+.2f}]")


def refusal_changes(runs: list[Run]) -> list[RefusalChange]:
    """Baseline vs strongest steered point, for every run that has both (and their intervals)."""
    changes = []
    for run in runs:
        points = {p["alpha"]: p for p in run.points if _number(p.get("refusal_rate"))}
        steered = [alpha for alpha in points if alpha > 0]
        if 0.0 not in points or not steered:
            continue
        baseline, strongest = points[0.0], points[max(steered)]
        cis = [p.get("refusal_ci95") for p in (baseline, strongest)]
        if not all(isinstance(ci, (list, tuple)) and len(ci) == 2 for ci in cis):
            continue
        ci95 = difference_interval(baseline["refusal_rate"], cis[0], strongest["refusal_rate"], cis[1])
        changes.append(RefusalChange(run, baseline, strongest, strongest["refusal_rate"] - baseline["refusal_rate"],
                                     ci95))
    return changes


def effect_sentence(changes: list[RefusalChange]) -> str:
    """One sentence: which runs reduced refusal and by how much, and what the others did, with intervals."""
    reduced = [c for c in changes if c.verdict == "reduced"]
    others = [c for c in changes if c.verdict != "reduced"]
    listed_others = "; ".join(f"{c.run.display} ({c.verdict}: {c.describe()})" for c in others)
    if not reduced:
        return f"None of the {len(changes)} run(s) reduced refusal: {listed_others}."
    sentence = "Reduced refusal: " + "; ".join(f"{c.run.display} ({c.describe()})" for c in reduced)
    return sentence + (f"; did not: {listed_others}." if others else ".")


def write_summary(runs: list[Run], path: Path, folder: Path, images: dict[str, Path],
                  skipped: list[tuple[Path, str]] = ()) -> Path:
    incomplete = sum(not run.complete for run in runs)
    lines = ["# cna report", "", f"{len(runs)} run(s) under `{folder}`"
             + (f", {incomplete} incomplete" if incomplete else "") + ".", ""]
    changes = refusal_changes(runs)
    if changes:
        lines += [effect_sentence(changes), "",
                  "(Change: the strongest point minus the same run's alpha = 0 point; 95% interval by Newcombe's "
                  "method, conservative for the shared prompts.)", ""]
    in_sample = [run for run in runs if run.results.get("in_sample")]
    if in_sample:
        lines += [f"**In-sample:** {len(in_sample)} run(s) discovered their circuit on prompts they are also "
                  "evaluated on (see the in-sample column); their numbers are not held-out results.", ""]

    lines += ["## Runs", ""]
    run_rows = []
    for run in runs:
        timings = run.results.get("timings_s") or {}
        total = sum(v for v in timings.values() if _number(v))
        run_rows.append([run.display, run.model, run.method, run.status, str(len(run.points)),
                         f"{total:.0f}" if timings else _MISSING, _in_sample_text(run), _folder_name(run.path, folder)])
    lines += _table(["run", "model", "method", "status", "points", "time (s)", "in-sample discovery", "folder"],
                    run_rows) + [""]

    lines += ["## Points", ""]
    rows = [point_row(run, point) for run in runs for point in run.points]
    lines += (_table(_TABLE_HEADER, rows) if rows else ["No finished points yet."]) + [""]

    with_circuit = neuron_runs(runs)
    if with_circuit:
        lines += ["## Neuron circuits", ""]
        for run in with_circuit:
            lines += _circuit_section(run)
    if len(with_circuit) >= 2:
        lines += _overlap_section(with_circuit)
    if len(_steered_points(runs)) >= 2:
        front = pareto_front(runs)
        lines += [f"## Pareto front: refusal vs KL at quality >= {QUALITY_FLOOR}", ""]
        lines += (_table(_TABLE_HEADER + ["folder"], [point_row(run, point) + [_folder_name(run.path, folder)]
                                                      for run, point in front])
                  if front else [f"No steered point keeps quality >= {QUALITY_FLOOR}."]) + [""]
    directions = [run for run in runs if run.direction is not None]
    if directions:
        lines += ["## Residual directions", ""] + [_direction_line(run) for run in directions] + [""]

    if skipped:
        lines += ["## Unreadable results", ""] + [f"- `{p}`: {_cell(reason)}" for p, reason in skipped] + [""]

    lines += ["## Figures", ""]
    lines += [f"- [{image.name}]({image.name})" for image in images.values()]
    lines += [""] + [f"![{name}]({image.name})" for name, image in images.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- entry points -----------------------------------------------------------------------------------------------

def write_report(folder: Path, out: Path | None = None) -> dict[str, Path]:
    """Figures and summary.md for every run folder under `folder`, written into `out` (default: `folder`).

    Returns {name: path} for every file written: the figure names (e.g. "refusal_quality_vs_alpha") and "summary".
    Raises NoRunsError when there is no results.json under `folder`.
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    runs, skipped = find_runs(folder)
    written = draw_figures(runs, out)
    written["summary"] = write_summary(runs, out / "summary.md", folder, dict(written), skipped)
    return written


def run_plots(run_dir: Path) -> dict[str, Path]:
    """The figures of one finished (or partial) run, written into `run_dir`; for the pipeline to log.

    Returns {figure name: path}. Raises FileNotFoundError when `run_dir` has no results.json.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).is_file():
        raise FileNotFoundError(f"no {RESULTS} in {run_dir}")
    run = load_run(run_dir)
    assign_labels([run], run_dir)
    return draw_figures([run], run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cna.report",
                                     description="Plots and summary.md from one run folder or a tree of run folders.")
    parser.add_argument("folder", type=Path, help="a run folder, or an outputs/multirun folder holding many")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the folder itself)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folder, args.out)
    except NoRunsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
