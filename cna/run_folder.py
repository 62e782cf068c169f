"""The run folder contract: its file names, atomic writes, resume, and recording a failed job.

A job writes `circuit.json`, then after every strength point `results.json` (rewritten atomically) and the
point's lines of `generations.jsonl`; the fields of each are listed in DESIGN.md ("Output contract"). Every
writer here leaves the old file or the new one on disk, never half of one, so a job killed at any moment
can be resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from cna.errors import CnaError

if TYPE_CHECKING:
    from cna.circuit import Circuit

log = logging.getLogger(__name__)

RESULTS, CIRCUIT, GENERATIONS = "results.json", "circuit.json", "generations.jsonl"
OVERRIDES = Path(".hydra") / "overrides.yaml"  # a Hydra job's command-line overrides

# The fields scripts, reports and sweeps read (DESIGN.md's contract); jobs add more (CIs, per-set rates, judge).
RESULTS_FIELDS = ("model", "method", "status", "points", "timings_s")
POINT_FIELDS = ("alpha", "multiplier", "refusal_rate", "refusal_ci95", "quality", "degenerate_rate", "mmlu_accuracy",
                "kl_divergence", "over_refusal_rate", "n_prompts")


def config_sha256(cfg: DictConfig) -> str:
    """What makes two jobs the same (and a run folder resumable): the resolved config less bookkeeping keys."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "logger", "hydra"):
        settings.pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def save_atomically(path: str | Path, save: Callable[[Path], object]) -> Path:
    """Call `save(temporary)` beside `path`, then rename: parallel jobs and readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file so that a killed process leaves the old file or the new one, never half of one."""
    return save_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON so that a killed process leaves the old file or the new one, never half of one."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; a missing, broken or non-UTF-8 file is one line naming it (CnaError)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CnaError(f"'{path}' does not exist") from error
    except UnicodeDecodeError as error:
        raise CnaError(f"'{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                       f"{error.start})") from error
    except json.JSONDecodeError as error:
        raise CnaError(f"'{path}' is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
                       ) from error
    if not isinstance(data, dict):
        raise CnaError(f"'{path}' holds a JSON {type(data).__name__}; expected an object")
    return data


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
    from cna.circuit import Circuit  # cna.circuit writes through this module

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


def read_results(run_dir: Path) -> dict | None:
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
    return results


def previous_results(run_dir: Path, config_sha256: str) -> dict | None:
    """What an earlier run of the same config left in the folder (complete or not), to resume from."""
    results = read_results(run_dir)
    return results if results is not None and results.get("config_sha256") == config_sha256 else None


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


def record_failure(run_dir: Path, *, model: str, method: str, config_sha256: str | None, error: str) -> dict:
    """Mark the job failed in results.json with its one-line reason, keeping any points it finished."""
    results = (config_sha256 and previous_results(run_dir, config_sha256)) or {
        "model": model, "method": method, "status": "failed", "config_sha256": config_sha256, "points": [],
        "timings_s": {}}
    results.update(status="failed", error=error)
    write_json_atomic(Path(run_dir) / RESULTS, results)
    return results
