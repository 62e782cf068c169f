"""summary.md for a tree of run folders, and the command line: python -m cna.report DIR [--out OUT]."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from cna.circuit import localisation
from cna.evaluation.metric import Field, metric_types
from cna.neurons import CARDS_MD, read_cards, token_list
from cna.report.analysis import (
    MISSING,
    QUALITY_FLOOR,
    behaviour_effects,
    effect_sentence,
    fmt,
    fmt_ci,
    neuron_runs,
    overlap_matrix,
    pareto_front,
    refusal_changes,
    steered_points,
)
from cna.report.figures import draw_figures
from cna.report.runs import NoRunsError, Run, find_runs, folder_name, is_number
from cna.run_folder import Point


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_fields(runs: list[Run]) -> list[Field]:
    """The points table's metric columns: every registered metric's fields, in the registry's order, that some
    point of these runs has."""
    keys = {key for run in runs for point in run.points for key in point.extra}
    fields = [f for metric in metric_types().values() for f in metric.measured_fields(keys) if f.table]
    return [f for f in fields if any(is_number(point.value(f.name)) for run in runs for point in run.points)]


def table_header(fields: list[Field]) -> list[str]:
    return ["run", "model", "method", "alpha", "m", *(f"{f.label} [95% CI]" if f.ci else f.label for f in fields),
            "n"]


def point_row(run: Run, point: Point, fields: list[Field]) -> list[str]:
    """One summary table row: how every number of a point is printed."""
    values = [fmt_ci(point.value(f.name), point.value(f.ci), f.digits) if f.ci else fmt(point.value(f.name), f.digits)
              for f in fields]
    return [run.display, run.short_model, run.method, fmt(point.alpha, "g"), fmt(point.multiplier, "g"), *values,
            str(point.n_prompts)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _judge_section(runs: list[Run]) -> list[str]:
    """Keyword and judge refusal side by side, for the points a judge scored (eval.judge or python -m cna.judge)."""
    rows = []
    for run in runs:
        judge = run.results.extra.get("judge") or {}
        for point in run.points:
            if point.value("judge_refusal_rate") is None:
                continue
            rows.append([run.display, f"{judge.get('name', MISSING)} ({judge.get('model', MISSING)})",
                         fmt(point.alpha, "g"), fmt_ci(point.refusal_rate, point.refusal_ci95),
                         fmt_ci(point.value("judge_refusal_rate"), point.value("judge_refusal_ci95")),
                         fmt_ci(point.value("judge_score"), point.value("judge_score_ci95")),
                         str(point.value("judge_parse_failures", MISSING))])
    if not rows:
        return []
    header = ["run", "judge (model)", "alpha", "keyword refusal [95% CI]", "judge refusal [95% CI]",
              "judge score [95% CI]", "unparsed"]
    return ["## Judge vs keyword refusal", ""] + _table(header, rows) + [""]


def behaviour_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs by behaviour (results written before behaviours existed are refusal's), in order of first run."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.behaviour, []).append(run)
    return groups


def _behaviour_section(runs: list[Run]) -> list[str]:
    """Each run's expected effects, measured: the removal field at its strongest ablation (m = 0, or the largest
    alpha) and the induction field at its strongest amplification (largest m), against its unsteered point."""
    rows = []
    for run in runs:
        for effect in behaviour_effects(run):
            rows.append([run.display, run.behaviour, effect.side, effect.field, fmt(effect.point.alpha, "g"),
                         fmt(effect.point.multiplier, "g"), fmt_ci(effect.before, effect.before_ci),
                         fmt_ci(effect.after, effect.after_ci), f"{effect.change:+.3f}", effect.verdict])
    if not rows:
        return []
    header = ["run", "behaviour", "effect", "field", "alpha", "m", "unsteered [95% CI]", "steered [95% CI]",
              "change", "as expected"]
    return ["## Behaviours: expected effects", "",
            "Removal is read at the strongest ablation point, induction at the strongest amplification (m > 1); "
            "'yes' where the steered interval lies wholly on the expected side of the unsteered value, 'no' where "
            "it lies on the other side, 'within noise' otherwise.", ""] + _table(header, rows) + [""]


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


def _stability_section(runs: list[Run]) -> list[str]:
    """Resampled discovery (method.stability): how alike the resampled circuits are, and the stable core."""
    rows = []
    for run in runs:
        found = run.circuit.stability
        if not found:
            continue
        steered = run.circuit.settings.get("stability_subset", "full")
        rows.append([run.display, f"{found['resamples']} x {found['fraction']:.0%}",
                     f"{fmt(found.get('jaccard_mean'))} ± {fmt(found.get('jaccard_sd'))} "
                     f"[{fmt(found.get('jaccard_min'))}, {fmt(found.get('jaccard_max'))}]",
                     fmt(found.get("halves_jaccard")),
                     f"{found['core_size']} / {found['k']} (>= {found['core_threshold']:.0%})",
                     f"{found['deepest_rank']} / {found['candidates']}", f"{steered} ({run.circuit.k})"])
    if not rows:
        return []
    header = ["run", "resamples x share", "Jaccard of resampled circuits: mean ± sd [min, max]", "halves Jaccard",
              "stable core / k", "deepest rank / candidates", "steered (neurons)"]
    return ["## Circuit stability", ""] + _table(header, rows) + [""]


def _neurons_section(runs: list[Run], page_folder: Path, top: int = 5) -> list[str]:
    """The top neurons of each run's cards (neurons.md in its folder, linked from `page_folder`), with the tokens
    their output weights promote."""
    lines = []
    for run in runs:
        found = read_cards(run.path)
        if found is None:
            continue
        _, cards = found
        rows = [[card.name, fmt(card.rank, "d") if card.rank is not None else MISSING, fmt(card.score, ".3g"),
                 fmt(card.selection_frequency), token_list(card.promoted[:5])]
                for card in sorted(cards, key=lambda c: (c.rank is None, c.rank or 0))[:top]]
        link = Path(os.path.relpath(run.path.resolve() / CARDS_MD, page_folder.resolve())).as_posix()
        lines += [f"### {run.display}", "", f"[all {len(cards)} cards]({link})", ""]
        lines += _table(["neuron", "rank", "score", "selection frequency", "promotes"], rows) + [""]
    return ["## Top neurons", ""] + lines if lines else []


def _overlap_section(runs: list[Run]) -> list[str]:
    """Shared (layer, neuron) pairs for every pair of circuits, as a count and a share of the smaller circuit."""
    matrix = overlap_matrix([run.circuit for run in runs])
    rows = []
    for i, j in itertools.combinations(range(len(runs)), 2):
        smaller = min(runs[i].circuit.k, runs[j].circuit.k)
        rows.append([runs[i].display, runs[j].display, f"{int(matrix[i, j])} / {smaller}",
                     f"{matrix[i, j] / smaller:.1%}" if smaller else MISSING])
    return ["## Circuit overlap", ""] + _table(["circuit", "circuit", "shared neurons", "share"], rows) + [""]


def _direction_line(run: Run) -> str:
    data = run.direction or {}
    layers = data.get("layers") or []
    edited = (f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers") if layers else "?"
    return (f"- {run.display}: mean difference at layer {data.get('source_layer', '?')}, edits {edited}, "
            f"|v| = {fmt(data.get('vector_norm'), '.4g')}")


def _in_sample_text(run: Run) -> str:
    """'no', 'yes (set: n, ...)', or n/a for results written before the overlap was recorded."""
    if "in_sample" not in run.results.extra:
        return MISSING
    overlap = {name: n for name, n in (run.results.extra.get("discovery_overlap") or {}).items() if n}
    return "yes (" + ", ".join(f"{name}: {n}" for name, n in overlap.items()) + ")" if overlap else "no"


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
    in_sample = [run for run in runs if run.results.extra.get("in_sample")]
    if in_sample:
        lines += [f"**In-sample:** {len(in_sample)} run(s) discovered their circuit on prompts they are also "
                  "evaluated on (see the in-sample column); their numbers are not held-out results.", ""]

    lines += ["## Runs", ""]
    run_rows = []
    for run in runs:
        timings = run.results.timings_s
        total = sum(v for v in timings.values() if is_number(v))
        status = f"{run.status}: {run.results.error}" if run.results.error else run.status
        run_rows.append([run.display, run.model, run.method, run.behaviour, status, str(len(run.points)),
                         f"{total:.0f}" if timings else MISSING, _in_sample_text(run), folder_name(run.path, folder)])
    lines += _table(["run", "model", "method", "behaviour", "status", "points", "time (s)", "in-sample discovery",
                     "folder"], run_rows) + [""]

    lines += ["## Points", ""]
    fields = table_fields(runs)
    by_behaviour = behaviour_groups(runs)
    if len(by_behaviour) > 1:  # each behaviour's own metrics: one table each
        for name, members in by_behaviour.items():
            own = table_fields(members)
            rows = [point_row(run, point, own) for run in members for point in run.points]
            lines += [f"### Behaviour: {name}", ""] + (_table(table_header(own), rows) if rows
                                                       else ["No finished points yet."]) + [""]
    else:
        rows = [point_row(run, point, fields) for run in runs for point in run.points]
        lines += (_table(table_header(fields), rows) if rows else ["No finished points yet."]) + [""]
    lines += _behaviour_section(runs)

    lines += _judge_section(runs)

    with_circuit = neuron_runs(runs)
    if with_circuit:
        lines += ["## Neuron circuits", ""]
        for run in with_circuit:
            lines += _circuit_section(run)
        lines += _stability_section(with_circuit)
        lines += _neurons_section(with_circuit, path.parent)
    if len(with_circuit) >= 2:
        lines += _overlap_section(with_circuit)
    if len(steered_points(runs)) >= 2:
        front = pareto_front(runs)
        lines += [f"## Pareto front: refusal vs KL at quality >= {QUALITY_FLOOR}", ""]
        lines += (_table(table_header(fields) + ["folder"], [point_row(run, point, fields)
                                                             + [folder_name(run.path, folder)]
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
