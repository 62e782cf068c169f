"""Reading run folders for a report: each run's results, circuit and overrides, and a label that tells it apart.

The files themselves are read by `cna.run_folder`, which owns the run folder contract.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cna.circuit import Circuit
from cna.errors import CnaError
from cna.io import read_json
from cna.run_folder import RESULTS, JobResults, Point, read_circuit, read_overrides

# Override keys that never tell two runs apart in a label: model and method are in the label already.
_LABEL_EXCLUDED_KEYS = {"model", "method", "resume", "logger"}


class NoRunsError(CnaError):
    """The folder holds no results.json at any depth."""


@dataclass
class Run:
    """One run folder: its results, its circuit (neuron circuit or residual direction) and its Hydra overrides."""

    path: Path
    results: JobResults
    circuit: Circuit | None = None  # neuron circuits (cna, random)
    direction: dict | None = None  # circuit.json of a residual-direction method (caa, direction), vector dropped
    overrides: list[str] = field(default_factory=list)
    label: str = ""  # "model-short-name/method", plus " [suffix]" where that alone is not unique
    suffix: str = ""

    @property
    def model(self) -> str:
        return self.results.model

    @property
    def short_model(self) -> str:
        return self.model.rstrip("/").rsplit("/", 1)[-1]

    @property
    def method(self) -> str:
        return self.results.method

    @property
    def behaviour(self) -> str:
        """The behaviour steered (results written before behaviours existed are refusal's)."""
        return str(self.results.extra.get("behaviour") or "refusal")

    @property
    def status(self) -> str:
        return self.results.status

    @property
    def complete(self) -> bool:
        return self.results.complete

    @property
    def display(self) -> str:
        """The label, marked when the run did not finish."""
        return self.label if self.complete else f"{self.label} (incomplete)"

    @property
    def two_line_display(self) -> str:
        """The display label broken before its suffix, for titles and tick labels."""
        base = f"{self.short_model}/{self.method}"
        second = " ".join(filter(None, [f"[{shorten(self.suffix, 40)}]" if self.suffix else "",
                                        "" if self.complete else "(incomplete)"]))
        return f"{base}\n{second}" if second else base

    @property
    def points(self) -> list[Point]:
        return sorted((p for p in self.results.points if is_number(p.alpha)), key=lambda p: p.alpha)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shorten(label: str, width: int = 60) -> str:
    """A label cut in the middle so that a figure's legend or tick never outgrows its axes."""
    if len(label) <= width:
        return label
    keep = (width - 1) // 2
    return f"{label[:keep]}…{label[-(width - 1 - keep):]}"


def load_run(run_dir: Path) -> Run:
    """Read one run folder; raises CnaError when its results.json is not a readable JSON object."""
    run_dir = Path(run_dir)
    run = Run(run_dir, JobResults.from_dict(read_json(run_dir / RESULTS)), overrides=read_overrides(run_dir))
    circuit = read_circuit(run_dir)
    if isinstance(circuit, Circuit):
        run.circuit = circuit
    elif circuit is not None:
        run.direction = {k: v for k, v in circuit.items() if k != "vector"}
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
        except (OSError, CnaError) as error:
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
    parts = [Path(folder_name(path, root)).parts for path in paths]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def folder_name(path: Path, root: Path) -> str:
    try:
        relative = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        relative = Path(path.name)
    return str(relative) if str(relative) != "." else path.name
