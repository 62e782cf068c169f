"""Figures, drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot: no display, no
global figure registry to leak, safe inside a pipeline job."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cna.methods import method_types
from cna.report.analysis import QUALITY_FLOOR, neuron_runs, overlap_matrix, pareto_front, steered_points
from cna.report.runs import Run, assign_labels, is_number, load_run, shorten
from cna.run_folder import RESULTS

DPI = 110


def _marker(method: str) -> str:
    """Each method's marker (cna.methods: a method plug-in declares its own), a diamond for unknown ones."""
    known = method_types().get(method)
    return known.marker if known is not None else "D"


FIGURES = ("refusal_quality_vs_alpha", "mmlu_vs_alpha", "kl_vs_alpha", "over_refusal_vs_alpha", "refusal_vs_kl",
           "layer_histogram", "expert_histogram", "circuit_overlap", "judge_vs_keyword")


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
        value = point.value(key)
        if not is_number(value):
            continue
        xs.append(point.alpha)
        ys.append(value)
        ci = point.value(ci_key) if ci_key else None
        cis.append(ci if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(is_number, ci)) else (value, value))
    has_ci = ci_key is not None and any(point.value(ci_key) for point in run.points if is_number(point.value(key)))
    return np.asarray(xs, float), np.asarray(ys, float), (np.asarray(cis, float) if has_ci and cis else None)


def _plot_metric(ax, runs: list[Run], colours: dict, key: str, ci_key: str | None) -> int:
    """One line per run with its CI as a shaded band; returns how many runs had the metric."""
    drawn = 0
    for run in runs:
        x, y, ci = _series(run, key, ci_key)
        if not len(x):
            continue
        colour = colours[id(run)]
        ax.plot(x, y, marker=_marker(run.method), markersize=4, linewidth=1.6, color=colour,
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
        texts = [shorten(label.removeprefix(shared).replace("method.", "")) for label in labels]
        fig.legend(handles, texts, loc="outside lower center", fontsize=8, frameon=False,
                   ncol=2 if len(handles) > 3 else len(handles), title=shared.rstrip("/") or None,
                   title_fontsize=8)


def _any(runs: list[Run], key: str) -> bool:
    return any(is_number(point.value(key)) for run in runs for point in run.points)


def kl_name(runs: list[Run]) -> str:
    """What the runs' kl_divergence measures, from results.json's kl_direction (older runs: steered first)."""
    directions = {run.results.extra.get("kl_direction", "steered||unsteered") for run in runs}
    if len(directions) != 1:
        return "KL (directions differ: see kl_direction)"
    first, second = directions.pop().split("||")
    return f"KL({first} || {second})"


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


def plot_refusal_vs_kl(runs: list[Run], path: Path) -> Path:
    """The trade-off a recipe search optimises: every steered point's refusal (95% CI) against its KL,
    with the Pareto front of the points at quality >= QUALITY_FLOOR as a dashed staircase."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    colours = _colours(runs)
    front = pareto_front(runs)
    if len(front) >= 2:
        ax.step([p.kl_divergence for _, p in front], [p.refusal_rate for _, p in front], where="post",
                color="0.4", linestyle="--", linewidth=1, label=f"Pareto front (quality >= {QUALITY_FLOOR})")
    for run, point in steered_points(runs):
        colour = colours[id(run)]
        ci = point.refusal_ci95
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(is_number, ci)):
            ax.errorbar(point.kl_divergence, point.refusal_rate, color=colour, linewidth=0.8,
                        yerr=[[point.refusal_rate - ci[0]], [ci[1] - point.refusal_rate]])
        kept = is_number(point.quality) and point.quality >= QUALITY_FLOOR
        ax.plot(point.kl_divergence, point.refusal_rate, marker=_marker(run.method), markersize=7,
                color=colour, markerfacecolor=colour if kept else "white", linestyle="none",
                label=run.display if len(run.points) == 1 else f"{run.display} a={point.alpha:g}")
    ax.set(title=f"Refusal vs KL at each steered point (hollow: quality < {QUALITY_FLOOR})",
           xlabel=f"{kl_name(runs)}, next token (nats)", ylabel="refusal rate", ylim=(-0.03, 1.03))
    ax.grid(True, alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


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


def expert_matrix(circuit) -> tuple[np.ndarray, list[str]]:
    """Neurons per (layer, expert) of a MoE circuit: [layers, routed experts + shared + dense], and column labels."""
    layout = circuit.experts["layout"]
    routed = max((spec.get("experts", 0) for spec in layout), default=0)
    labels = [str(e) for e in range(routed)] + ["shared", "dense"]
    matrix = np.zeros((circuit.n_layers, routed + 2), dtype=int)
    for (layer, expert), count in circuit.expert_counts.items():
        column = routed + 1 if expert is None else min(expert, routed)  # every shared expert in one column
        matrix[layer, column] += count
    return matrix, labels


def plot_expert_histogram(runs: list[Run], path: Path) -> Path:
    """Neurons per (layer, expert), one heatmap per circuit of a mixture of experts (the expert axis)."""
    circuits = [run for run in neuron_runs(runs) if run.circuit.experts is not None]
    fig = Figure(figsize=(6.5, 3.2 * len(circuits)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(circuits), 1, squeeze=False)).ravel()
    for ax, run in zip(axes, circuits, strict=True):
        matrix, labels = expert_matrix(run.circuit)
        image = ax.imshow(matrix, cmap="Blues", aspect="auto", interpolation="nearest", vmin=0)
        step = max(1, len(labels) // 16)
        ax.set_xticks(range(0, len(labels), step), labels[::step], fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{run.two_line_display}  k={run.circuit.k}: neurons per (layer, expert)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


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
    ax.set_title("Shared neurons |A ∩ B| (layer, [expert,] index); diagonal = k", fontsize=10)
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
                                                           f"{kl_name(runs)}, next token", "KL (nats)",
                                                           unit_range=False))
    if _any(runs, "over_refusal_rate"):
        figure("over_refusal_vs_alpha", lambda p: plot_single_metric(runs, p, "over_refusal_rate", "over_refusal_ci95",
                                                                     "Over-refusal on benign prompts (95% CI)",
                                                                     "refusal rate"))
    if _any(runs, "judge_refusal_rate"):
        figure("judge_vs_keyword", lambda p: plot_judge_vs_keyword(runs, p))
    if len(steered_points(runs)) >= 2:
        figure("refusal_vs_kl", lambda p: plot_refusal_vs_kl(runs, p))
    if neuron_runs(runs):
        figure("layer_histogram", lambda p: plot_layer_histogram(runs, p))
    if any(run.circuit.experts is not None for run in neuron_runs(runs)):
        figure("expert_histogram", lambda p: plot_expert_histogram(runs, p))
    if len(neuron_runs(runs)) >= 2:
        figure("circuit_overlap", lambda p: plot_circuit_overlap(runs, p))
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
