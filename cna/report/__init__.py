"""Plots and a summary page from one run folder or a tree of them (a Hydra `outputs/` or `multirun/` folder).

    python -m cna.report DIR [--out OUT]

A run folder is any folder holding a `results.json` (see the output contract in DESIGN.md); its `circuit.json`
and `.hydra/overrides.yaml` are read when present. The parts:
- `runs`: reading run folders and labelling them;
- `analysis`: the refusal-vs-KL Pareto front, circuit overlaps, each run's refusal change;
- `figures`: the plots (Agg canvas, never pyplot);
- `summary`: summary.md and the command line.
"""

from cna.report.analysis import (
    QUALITY_FLOOR,
    RefusalChange,
    effect_sentence,
    neuron_runs,
    overlap_matrix,
    pareto_front,
    refusal_changes,
)
from cna.report.figures import (
    FIGURES,
    draw_figures,
    plot_circuit_overlap,
    plot_judge_vs_keyword,
    plot_layer_histogram,
    plot_refusal_quality,
    plot_refusal_vs_kl,
    plot_single_metric,
    run_plots,
)
from cna.report.runs import NoRunsError, Run, assign_labels, find_runs, load_run
from cna.report.summary import main, point_row, table_fields, table_header, write_report, write_summary

__all__ = ["FIGURES", "QUALITY_FLOOR", "NoRunsError", "RefusalChange", "Run", "assign_labels", "draw_figures",
           "effect_sentence", "find_runs", "load_run", "main", "neuron_runs", "overlap_matrix", "pareto_front",
           "plot_circuit_overlap", "plot_judge_vs_keyword", "plot_layer_histogram", "plot_refusal_quality",
           "plot_refusal_vs_kl", "plot_single_metric", "point_row", "refusal_changes", "run_plots", "table_fields",
           "table_header", "write_report",
           "write_summary"]
