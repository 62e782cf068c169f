"""The run folder contract: its file names, the typed results (`Point`, `JobResults`), resume, and recording a
failed job.

A job writes `circuit.json`, then after every strength point `results.json` (rewritten atomically) and the
point's lines of `generations.jsonl`; the fields of each are listed in DESIGN.md ("Output contract"). Every
writer leaves the old file or the new one on disk, never half of one (cna.io), so a job killed at any moment
can be resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cna.circuit import Circuit
from cna.errors import CnaError
from cna.io import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

RESULTS, CIRCUIT, GENERATIONS = "results.json", "circuit.json", "generations.jsonl"
OVERRIDES = Path(".hydra") / "overrides.yaml"  # a Hydra job's command-line overrides

# The fields scripts, reports and sweeps read (DESIGN.md's contract); jobs add more (CIs, per-set rates, judge).
RESULTS_FIELDS = ("model", "method", "status", "points", "timings_s")
POINT_FIELDS = ("alpha", "multiplier", "refusal_rate", "refusal_ci95", "quality", "degenerate_rate", "mmlu_accuracy",
                "kl_divergence", "over_refusal_rate", "n_prompts")


def config_sha256(settings: dict) -> str:
    """What makes two jobs the same (and a run folder resumable): the resolved config less bookkeeping keys and the
    behaviour's label (its name and expected effects measure nothing: its prompts and metrics are in the rest)."""
    settings = {key: value for key, value in settings.items() if key not in ("resume", "logger", "hydra", "behaviour")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class Point:
    """One strength point of results.json: the contract's fields (DESIGN.md), then every other field the job's
    metrics measured (intervals, per-set rates, a judge's verdicts, plug-in metrics) in `extra`."""

    alpha: float
    multiplier: float | None = None
    refusal_rate: float | None = None
    refusal_ci95: list[float] | None = None
    quality: float | None = None
    degenerate_rate: float | None = None
    mmlu_accuracy: float | None = None
    kl_divergence: float | None = None
    over_refusal_rate: float | None = None
    n_prompts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, name: str, default: Any = None) -> Any:
        """A field by name, contract or extra (None or `default` where the job did not measure it)."""
        found = getattr(self, name) if name in POINT_FIELDS else self.extra.get(name)
        return default if found is None else found

    def to_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in POINT_FIELDS}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> Point:
        known = {name: data[name] for name in POINT_FIELDS if name in data}
        return cls(**known, extra={k: v for k, v in data.items() if k not in POINT_FIELDS})


@dataclass
class JobResults:
    """results.json: the job's identity and status, its points and seconds per stage, then the job-level fields
    its metrics and caches add (`extra`: config_sha256, in_sample, kl_direction, judge, prefix_reuse, ...)."""

    model: str
    method: str
    status: str = "running"  # running | complete | failed
    points: list[Point] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the one-line reason of a failed job
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_dict(self) -> dict:
        data = {"model": self.model, "method": self.method, "status": self.status, **self.extra,
                "points": [point.to_dict() for point in self.points], "timings_s": self.timings_s}
        return data | ({"error": self.error} if self.error is not None else {})

    @classmethod
    def from_dict(cls, data: dict) -> JobResults:
        """Any results.json, old or new; a point that is not an object with a number alpha is dropped."""
        points = [Point.from_dict(p) for p in data.get("points") or []
                  if isinstance(p, dict) and isinstance(p.get("alpha"), int | float)
                  and not isinstance(p["alpha"], bool)]
        timings = data.get("timings_s") if isinstance(data.get("timings_s"), dict) else {}
        own = {"model", "method", "status", "points", "timings_s", "error"}
        return cls(model=str(data.get("model", "?")), method=str(data.get("method", "?")),
                   status=str(data.get("status", "unknown")), points=points, timings_s=dict(timings),
                   error=data.get("error"), extra={k: v for k, v in data.items() if k not in own})


def read_overrides(run_dir: Path) -> list[str]:
    """A Hydra job's command-line overrides (.hydra/overrides.yaml); none when absent or unreadable."""
    path = Path(run_dir) / OVERRIDES
    if not path.is_file():
        return []
    try:
        import yaml

        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a broken overrides file only costs a report label its suffix
        return []
    return [str(item) for item in items] if isinstance(items, list) else []


def read_circuit(run_dir: Path) -> Circuit | dict | None:
    """The folder's circuit.json: a Circuit (neuron methods), the file's object (residual directions),
    or None when it is absent or unreadable."""
    try:
        data = read_json(Path(run_dir) / CIRCUIT)
    except (OSError, CnaError):
        return None
    if not isinstance(data.get("neurons"), list):
        return data
    try:
        return Circuit.from_dict(data)
    except (KeyError, TypeError, ValueError):
        return None


def move_aside(path: Path, problem: str) -> Path:
    """Rename an unreadable file to `<name>.corrupt-<time>` (kept for inspection) and warn."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    log.warning("%s is unreadable (%s): moved to %s; the job starts afresh", path, problem, aside.name)
    return aside


def read_results(run_dir: Path) -> JobResults | None:
    """The folder's results.json, or None when there is none; an unreadable one is moved aside (None)."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    try:
        results = read_json(path)
    except CnaError as error:
        move_aside(path, str(error))
        return None
    if not isinstance(results.get("points"), list):
        move_aside(path, "not a results object with a list of points")
        return None
    return JobResults.from_dict(results)


def previous_results(run_dir: Path, config_sha256: str) -> JobResults | None:
    """What an earlier run of the same config left in the folder (complete or not), to resume from."""
    results = read_results(run_dir)
    return results if results is not None and results.extra.get("config_sha256") == config_sha256 else None


def keep_finished_generations(run_dir: Path, finished: set[float]) -> list[dict]:
    """Drop generation lines of points that have no results yet (and a line cut short by a kill); return the rest."""
    path = Path(run_dir) / GENERATIONS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # half a line: the process died while writing it
        if isinstance(record, dict) and record.get("alpha") in finished:
            records.append(record)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def append_generations(run_dir: Path, records: list[dict]) -> None:
    with (Path(run_dir) / GENERATIONS).open("a", encoding="utf-8") as lines:
        lines.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def record_failure(run_dir: Path, *, model: str, method: str, config_sha256: str | None, error: str) -> JobResults:
    """Mark the job failed in results.json with its one-line reason, keeping any points it finished."""
    results = (config_sha256 and previous_results(run_dir, config_sha256)) or JobResults(
        model, method, extra={"config_sha256": config_sha256})
    results.status, results.error = "failed", error
    write_json_atomic(Path(run_dir) / RESULTS, results.to_dict())
    return results
