"""Weights & Biases for one job: the config, one history row per strength point (alpha is the x-axis), the
circuit as an artifact, a table of its neuron cards, one table of every generation, plots, and the final results as
the run summary.

W&B never fails a job. Every call into wandb is guarded: the first exception becomes one warning (through
`logging`) and the tracker then does nothing for the rest of the job; the job's own files are unaffected.

Mode (`logger.mode`, overridden by a `WANDB_MODE` environment variable when that is set, or by
`WANDB_DISABLED=true`):
- `auto`: online when an API key is configured (`WANDB_API_KEY`, `WANDB_IDENTITY_TOKEN_FILE` or a netrc entry
  for the W&B host) and the server answers, otherwise offline;
- `online`: online; offline with a warning when no API key is configured (wandb never prompts for one) or
  when the online start fails;
- `offline`: the run is written under `<run_dir>/wandb/offline-run-*`; upload it later with `wandb sync`;
- `disabled`: nothing is recorded (the same as `logger: none`).

`read_offline_run` reads an offline run's transaction log back (history, summary, config, artifacts), to check
what a job recorded without uploading it.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import socket
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from cna.run_folder import read_json

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"
GENERATION_COLUMNS = ("alpha", "set", "prompt", "response", "refused", "quality")
# The rows at alpha = 1 (full ablation) as a table of their own: W&B's table panels cannot filter rows.
FULL_STRENGTH_TABLE = "generations_alpha_1"
NEURON_TABLE = "neurons"  # the neuron cards, one row per circuit neuron (cna/neurons.py)
PROBE_TIMEOUT_S = 3.0
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")


# --- the trackers -----------------------------------------------------------------------------------------------

class Tracker:
    """What the pipeline calls; this base class records nothing."""

    def log_circuit(self, path: Path) -> None:
        """Record circuit.json (an artifact of type "circuit")."""

    def log_neurons(self, rows: list[dict]) -> None:
        """Record the neuron cards (cna.neurons.NeuronCard.table_row, one flat row per neuron) as a table."""

    def log_point(self, point: dict) -> None:
        """Record one strength point (a results.json "points" entry)."""

    def log_generations(self, records: list[dict]) -> None:
        """Add generation records {"alpha", "set", "prompt", "response", "refused", "quality"}."""

    def log_images(self, images: dict[str, Path]) -> None:
        """Record PNG plots by name."""

    def finish(self, results: dict, failed: bool = False) -> None:
        """Record the final results and close the run."""


class NullTracker(Tracker):
    """`logger: none`, W&B disabled, or W&B unavailable: every method does nothing."""


def make_tracker(cfg: DictConfig, *, run_dir: Path, group: str | None = None) -> Tracker:
    """The tracker `cfg.logger` asks for; never raises (a broken W&B gives a NullTracker and a warning)."""
    try:
        logger = OmegaConf.select(cfg, "logger", default=None) or {}
        name = logger.get("name") or "none"
        if name == "none":
            return NullTracker()
        if name != "wandb":
            log.warning("logger.name: expected wandb or none, got %r; nothing is tracked", name)
            return NullTracker()
        mode = resolve_mode(logger.get("mode") or "auto")
        if mode == "disabled":
            log.info("W&B disabled: nothing is tracked")
            return NullTracker()
        tracker = WandbTracker(cfg, run_dir=Path(run_dir), group=group, mode=mode)
    except Exception as error:  # tracking must never fail a job
        log.warning("W&B setup failed, continuing without W&B: %s: %s", type(error).__name__, error)
        return NullTracker()
    return tracker if tracker.run is not None else NullTracker()


class WandbTracker(Tracker):
    """One W&B run per job; see the module docstring for the modes and the failure rule."""

    def __init__(self, cfg: DictConfig, *, run_dir: Path, group: str | None, mode: str):
        self.run: Any = None
        self.mode = mode
        self.run_dir = run_dir
        self.offline_dir: Path | None = None
        self._records: list[dict] = []
        self._logged: set[str] = set()  # metric names in the history, whose last value W&B keeps in the summary
        self._wandb: Any = None
        self._model = str(OmegaConf.select(cfg, "model.name", default=None) or "model")
        self._method = str(OmegaConf.select(cfg, "method.name", default=None) or "method")
        with self._guard("start"):
            self.run = self._start(cfg, group)

    # -- start

    def _start(self, cfg: DictConfig, group: str | None) -> Any:
        import wandb

        self._wandb = wandb
        logger = cfg.logger
        console = logger.get("console") or "off"  # W&B's copy of stdout/stderr; the job has its own log file
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("WANDB_MODE", "online").strip().lower() not in _WANDB_MODES:
            os.environ.pop("WANDB_MODE")  # wandb's settings would reject it; resolve_mode has warned already
        init = dict(
            project=logger.get("project") or "cna", entity=logger.get("entity") or None, group=group or None,
            job_type=self._method, tags=_tags(self._model, self._method), name=self.run_dir.name,
            dir=str(self.run_dir), config=_config(cfg),
        )
        try:
            run = wandb.init(mode=self.mode, settings=_settings(wandb, console), **init)
        except Exception as error:
            if self.mode != "online":
                raise
            log.warning("W&B online start failed (%s: %s); logging offline instead", type(error).__name__, error)
            self.mode = "offline"
            run = wandb.init(mode="offline", settings=_settings(wandb, console), **init)
        run.define_metric("alpha")
        run.define_metric("*", step_metric="alpha")
        if self.mode == "offline":
            self.offline_dir = Path(run.dir).parent
            log.info("W&B run %s is offline in %s", run.id, self.offline_dir)
        else:
            log.info("W&B run: %s", run.url)
        return run

    # -- failure handling

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # tracking must never fail a job
            log.warning("W&B %s failed, continuing without W&B: %s: %s", action, type(error).__name__, error)
            run, self.run = self.run, None
            self._records = []
            if run is not None:
                try:
                    run.finish(exit_code=1)
                except Exception:
                    log.debug("closing the W&B run after a failure failed too", exc_info=True)

    # -- the interface

    def log_circuit(self, path: Path) -> None:
        if self.run is None:
            return
        with self._guard("logging the circuit"):
            path = Path(path)
            content = read_json(path)
            metadata = {k: v for k, v in content.items()  # the neurons are in the file; metadata stays small
                        if k != "neurons" and (not isinstance(v, list) or len(v) <= 64)}
            artifact = self._wandb.Artifact(
                _artifact_name("circuit", _short_name(self._model), self._method), type="circuit",
                description=f"{self._method} circuit of {self._model}", metadata=metadata)
            artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact)
            self.run.summary.update({f"circuit/{k}": v for k, v in content.items()
                                     if isinstance(v, Real) and not isinstance(v, bool)})

    def log_neurons(self, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        with self._guard("logging the neuron table"):
            columns = list(dict.fromkeys(key for row in rows for key in row))
            self.run.summary[NEURON_TABLE] = self._wandb.Table(
                columns=columns, data=[[row.get(column) for column in columns] for row in rows],
                allow_mixed_types=True)

    def log_point(self, point: dict) -> None:
        if self.run is None:
            return
        with self._guard("logging a point"):
            metrics = point_metrics(point)
            self.run.log(metrics)
            self._logged.update(metrics)

    def log_generations(self, records: list[dict]) -> None:
        if self.run is None:
            return
        # One table at finish: a table logged after every point would upload every earlier row again.
        self._records.extend(dict(record) for record in records)

    def log_images(self, images: dict[str, Path]) -> None:
        if self.run is None or not images:
            return
        with self._guard("logging plots"):
            self.run.log({f"plots/{name}": self._wandb.Image(str(path)) for name, path in images.items()})

    def finish(self, results: dict, failed: bool = False) -> None:
        if self.run is None:
            return
        with self._guard("logging the generations table"):
            if self._records:
                # In the summary rather than the history: no extra history row, and still one table artifact.
                self.run.summary["generations"] = self._table(self._records)
                full_strength = [record for record in self._records if record.get("alpha") == 1.0]
                if full_strength:
                    self.run.summary[FULL_STRENGTH_TABLE] = self._table(full_strength)
        if self.run is None:
            return
        with self._guard("finishing the run"):
            values = summary_values(results, failed)
            self.run.summary.update({**values, "run_dir": str(self.run_dir.resolve())})
            for stale in sorted(self._logged - set(values)):  # e.g. a metric that is None at the last point
                del self.run.summary[stale]
            run, self.run = self.run, None
            self._records = []
            run.finish(exit_code=1 if failed else 0)
            if self.offline_dir is not None:
                log.info("W&B run saved offline; upload it with: wandb sync %s", self.offline_dir)

    def _table(self, records: list[dict]) -> Any:
        extra = [k for k in dict.fromkeys(k for r in records for k in r) if k not in GENERATION_COLUMNS]
        columns = [*GENERATION_COLUMNS, *extra]
        rows = [[record.get(column) for column in columns] for record in records]
        return self._wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


# --- what gets logged -------------------------------------------------------------------------------------------

def point_metrics(point: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of a results point, flat: None is skipped, `x_ci95: [lo, hi]` becomes
    `x_ci95_low`/`x_ci95_high`, and `over_refusal: {set: {"rate", "ci95", "n"}}` becomes
    `over_refusal/<set>` (the rate), `over_refusal/<set>_ci95_low`/`_high` and `over_refusal/<set>_n`."""
    metrics: dict[str, float] = {}
    for key, value in point.items():
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


def summary_values(results: Mapping[str, Any], failed: bool = False) -> dict[str, Any]:
    """The run summary: status, the flattened scalars of the last point, timings and identity."""
    points = results.get("points") or []
    values: dict[str, Any] = {"status": "failed" if failed else results.get("status", "complete"),
                              "n_points": len(points)}
    if points:
        values.update(point_metrics(points[-1]))
    for stage, seconds in (results.get("timings_s") or {}).items():
        if isinstance(seconds, Real):
            values[f"timings_s/{stage}"] = seconds
    for key in ("model", "method", "config_sha256"):
        if isinstance(results.get(key), str):
            values[key] = results[key]
    return values


def _short_name(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def _tags(model: str, method: str) -> list[str]:
    return [tag[:64] for tag in (_short_name(model), method) if tag]


def _artifact_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-.")[:128]


def _config(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # an unresolvable key should not cost the whole config
        log.debug("config interpolation failed (%s): logging it unresolved", error)
        return OmegaConf.to_container(cfg, resolve=False)


def _settings(wandb: Any, console: str = "off") -> Any:
    """Quiet, non-interactive settings; keys this wandb version does not know are left out."""
    wanted = dict(console=console, silent=True, reinit="finish_previous")
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:
        wanted = {key: value for key, value in wanted.items() if key in fields}
    try:
        return wandb.Settings(**wanted)
    except Exception:  # an older wandb with other value types
        return wandb.Settings(console=console, silent=True)


# --- mode resolution --------------------------------------------------------------------------------------------

def resolve_mode(requested: str = "auto") -> str:
    """online, offline or disabled: `WANDB_MODE` wins over `requested`; see the module docstring."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = _MODE_ALIASES.get(env, env)
    if not env and os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        env = "disabled"
    mode = str(requested).strip().lower()
    mode = _MODE_ALIASES.get(mode, mode)
    if env:
        if env in MODES:
            mode = env
        else:
            log.warning("WANDB_MODE=%s: expected one of %s; using logger.mode", env, ", ".join(MODES))
    if mode not in MODES:
        log.warning("logger.mode: expected one of %s, got %r; using auto", ", ".join(MODES), mode)
        mode = "auto"
    if mode == "auto":
        online = api_key_available() and server_reachable()
        return "online" if online else "offline"
    if mode == "online" and not api_key_available():
        log.warning("W&B mode online but no API key is configured (`wandb login` or WANDB_API_KEY): "
                    "logging offline instead")
        return "offline"
    return mode


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def api_key_available(url: str | None = None) -> bool:
    """Whether wandb would find credentials without prompting: environment variables, then netrc."""
    if os.environ.get("WANDB_API_KEY", "").strip() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return True
    host = urlsplit(url or base_url()).netloc
    if not host:
        return False
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            return False
        return bool(entry and entry[2])
    return False


def server_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url` (default: the W&B server), or the HTTPS proxy in front of it, opens
    within `timeout`; the config checks also ask it about the model hub."""
    parts = urlsplit(url or base_url())
    if not parts.hostname:
        return False
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxied.hostname:
            host, port = proxied.hostname, proxied.port or (443 if proxied.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:  # in a thread: a hanging DNS lookup ignores socket timeouts
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(opened)


# --- reading an offline run back --------------------------------------------------------------------------------

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
