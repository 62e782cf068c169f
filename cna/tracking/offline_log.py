"""Reading a W&B run's local transaction log back: what `wandb sync` would upload, without uploading it.

The log is a 7-byte header, then LevelDB-log style 32 KiB blocks of CRC-checked chunks holding protobuf
records (run, config, history, summary, artifact, files, exit). Used to check what a job recorded (the tests,
`python -m cna.dashboard --check`).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OfflineRun:
    """What an offline run recorded, as `wandb sync` would upload it."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # {"name", "type", "files", "metadata"}
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None


_LOG_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_run_files(path: str | Path) -> list[Path]:
    """The `.wandb` transaction logs of the runs under `path` (a job's run folder, its `wandb` folder, an
    `offline-run-*` or `run-*` folder, or a `.wandb` file), oldest first. Online runs keep one too."""
    path = Path(path)
    if path.is_file():
        return [path]
    for pattern in ("*.wandb", "*run-*/*.wandb", "wandb/*run-*/*.wandb"):
        found = [f for f in path.glob(pattern) if f.parent.name != "latest-run"]
        if found:
            return sorted(found, key=lambda f: f.parent.name.removeprefix("offline-"))
    return []


def read_offline_run(path: str | Path, wait_s: float = 30.0) -> OfflineRun:
    """Read a run's local transaction log (the newest run under `path`, see `offline_run_files`): what
    `wandb sync` would upload, without uploading it.

    `run.finish()` can return before W&B's writer process has written the log's last records (seen on a
    loaded machine), so a log without its exit record is read again for up to `wait_s` seconds.
    """
    from wandb.proto import wandb_internal_pb2

    files = offline_run_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no W&B run (wandb/offline-run-*/run-*.wandb) found")
    deadline = time.monotonic() + wait_s
    while True:
        run = OfflineRun(path=files[-1])
        for chunk in _transaction_records(files[-1]):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            _apply(run, record)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _transaction_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B transaction log: a 7-byte header, then LevelDB-log style 32 KiB blocks of chunks."""
    data = path.read_bytes()
    ident, magic, _version = _LOG_HEADER.unpack_from(data, 0) if len(data) >= _LOG_HEADER.size else (b"", 0, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log")
    position, pending = _LOG_HEADER.size, b""
    while position + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _RECORD_HEADER.size:  # block trailer padding
            position += left
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, position)
        start = position + _RECORD_HEADER.size
        chunk = data[start:start + length]
        if kind == 0 or len(chunk) < length:  # zero padding, or a run still being written
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: corrupt record at byte {position}")
        position = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set(target: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[keys[-1]] = value


def _remove(target: dict, keys: list[str]) -> None:
    for key in keys[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return
    target.pop(keys[-1], None)


def _apply(run: OfflineRun, record: Any) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        r = record.run
        run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
        run.group, run.job_type, run.tags = r.run_group, r.job_type, list(r.tags)
        for item in r.config.update:
            _set(run.config, _item_path(item), json.loads(item.value_json))
    elif kind == "config":
        for item in record.config.update:
            _set(run.config, _item_path(item), json.loads(item.value_json))
        for item in record.config.remove:
            _remove(run.config, _item_path(item))
    elif kind == "history":
        row: dict = {}
        for item in record.history.item:
            _set(row, _item_path(item), json.loads(item.value_json))
        run.history.append(row)
    elif kind == "summary":
        for item in record.summary.update:
            _set(run.summary, _item_path(item), json.loads(item.value_json))
        for item in record.summary.remove:
            _remove(run.summary, _item_path(item))
    elif kind == "artifact":
        a = record.artifact
        run.artifacts.append({"name": a.name, "type": a.type, "files": [c.path for c in a.manifest.contents],
                              "metadata": json.loads(a.metadata) if a.metadata else {}})
    elif kind == "files":
        run.files += [f.path for f in record.files.files]
    elif kind == "exit":
        run.exit_code = record.exit.exit_code
