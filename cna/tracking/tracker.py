"""What a job reports to an experiment tracker, and the flat values it logs: one history row per strength point
(alpha is the x-axis), the circuit, the generations, the plots, and the final results as the run summary."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from cna.run_folder import JobResults, Point

GENERATION_COLUMNS = ("alpha", "set", "prompt", "response", "refused", "quality")
# The rows at alpha = 1 (full ablation) as a table of their own: W&B's table panels cannot filter rows.
FULL_STRENGTH_TABLE = "generations_alpha_1"
NEURON_TABLE = "neurons"  # the neuron cards, one row per circuit neuron (cna/neurons.py)


class Tracker:
    """What the pipeline calls; this base class records nothing."""

    def log_circuit(self, path: Path) -> None:
        """Record circuit.json (an artifact of type "circuit")."""

    def log_neurons(self, rows: list[dict]) -> None:
        """Record the neuron cards (cna.neurons.NeuronCard.table_row, one flat row per neuron) as a table."""

    def log_point(self, point: Point) -> None:
        """Record one strength point (a results.json "points" entry)."""

    def log_generations(self, records: list[dict]) -> None:
        """Add generation records {"alpha", "set", "prompt", "response", "refused", "quality"}."""

    def log_images(self, images: dict[str, Path]) -> None:
        """Record PNG plots by name."""

    def finish(self, results: JobResults, failed: bool = False) -> None:
        """Record the final results and close the run."""


class NullTracker(Tracker):
    """`logger: none`, W&B disabled, or W&B unavailable: every method does nothing."""


def point_metrics(point: Point | Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of a results point, flat: None is skipped, `x_ci95: [lo, hi]` becomes
    `x_ci95_low`/`x_ci95_high`, and `over_refusal: {set: {"rate", "ci95", "n"}}` becomes
    `over_refusal/<set>` (the rate), `over_refusal/<set>_ci95_low`/`_high` and `over_refusal/<set>_n`."""
    metrics: dict[str, float] = {}
    for key, value in (point.to_dict() if isinstance(point, Point) else point).items():
        _flatten(str(key), value, metrics)
    return metrics


def _flatten(name: str, value: Any, out: dict[str, float]) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        out[name] = int(value)
    elif isinstance(value, Real):
        out[name] = value
    elif isinstance(value, (list, tuple)):
        if len(value) == 2 and name.endswith("ci95"):
            _flatten(f"{name}_low", value[0], out)
            _flatten(f"{name}_high", value[1], out)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key == "rate":
                _flatten(name, item, out)
            else:
                _flatten(f"{name}/{key}" if isinstance(item, Mapping) else f"{name}_{key}", item, out)


def summary_values(results: JobResults, failed: bool = False) -> dict[str, Any]:
    """The run summary: status, the flattened scalars of the last point, timings and identity."""
    status = "failed" if failed else (results.status if results.status != "running" else "complete")
    values: dict[str, Any] = {"status": status, "n_points": len(results.points)}
    if results.points:
        values.update(point_metrics(results.points[-1]))
    for stage, seconds in results.timings_s.items():
        if isinstance(seconds, Real):
            values[f"timings_s/{stage}"] = seconds
    values.update(model=results.model, method=results.method)
    if isinstance(results.extra.get("behaviour"), str):
        values["behaviour"] = results.extra["behaviour"]
    if isinstance(results.extra.get("config_sha256"), str):
        values["config_sha256"] = results.extra["config_sha256"]
    return values
