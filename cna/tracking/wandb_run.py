"""Weights & Biases for one job: the config, one history row per strength point (alpha is the x-axis), the
circuit as an artifact, one table of every generation, plots, and the final results as the run summary.

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

`cna.tracking.offline_log.read_offline_run` reads an offline run back without uploading it.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cna.io import read_json
from cna.network import server_reachable
from cna.run_folder import JobResults, Point
from cna.tracking.tracker import (
    FULL_STRENGTH_TABLE,
    GENERATION_COLUMNS,
    NEURON_TABLE,
    NullTracker,
    Tracker,
    point_metrics,
    summary_values,
)

if TYPE_CHECKING:
    from cna.config import LoggerConfig

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")


def make_tracker(logger: LoggerConfig, *, run_dir: Path, model: str, method: str, config: dict | None = None,
                 group: str | None = None, behaviour: str | None = None) -> Tracker:
    """The tracker `logger` asks for; never raises (a broken W&B gives a NullTracker and a warning)."""
    try:
        if logger.name == "none":
            return NullTracker()
        mode = resolve_mode(logger.mode)
        if mode == "disabled":
            log.info("W&B disabled: nothing is tracked")
            return NullTracker()
        tracker = WandbTracker(logger, run_dir=Path(run_dir), group=group, mode=mode, model=model, method=method,
                               config=config or {}, behaviour=behaviour)
    except Exception as error:  # tracking must never fail a job
        log.warning("W&B setup failed, continuing without W&B: %s: %s", type(error).__name__, error)
        return NullTracker()
    return tracker if tracker.run is not None else NullTracker()


class WandbTracker(Tracker):
    """One W&B run per job; see the module docstring for the modes and the failure rule."""

    def __init__(self, logger: LoggerConfig, *, run_dir: Path, group: str | None, mode: str, model: str,
                 method: str, config: dict, behaviour: str | None = None):
        self.run: Any = None
        self.mode = mode
        self.run_dir = run_dir
        self.offline_dir: Path | None = None
        self._records: list[dict] = []
        self._logged: set[str] = set()  # metric names in the history, whose last value W&B keeps in the summary
        self._wandb: Any = None
        self._model, self._method = model or "model", method or "method"
        self._behaviour = behaviour
        with self._guard("start"):
            self.run = self._start(logger, group, config)

    # -- start

    def _start(self, logger: LoggerConfig, group: str | None, config: dict) -> Any:
        import wandb

        self._wandb = wandb
        console = logger.console or "off"  # W&B's copy of stdout/stderr; the job has its own log file
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("WANDB_MODE", "online").strip().lower() not in _WANDB_MODES:
            os.environ.pop("WANDB_MODE")  # wandb's settings would reject it; resolve_mode has warned already
        init = dict(
            project=logger.project or "cna", entity=logger.entity or None, group=group or None,
            job_type=self._method, tags=_tags(self._model, self._method, self._behaviour), name=self.run_dir.name,
            dir=str(self.run_dir), config=config,
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

    def log_point(self, point: Point) -> None:
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

    def finish(self, results: JobResults, failed: bool = False) -> None:
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


def _short_name(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def _tags(model: str, method: str, behaviour: str | None = None) -> list[str]:
    """The model's short name, the method and the behaviour (`behaviour:<name>`, so it cannot clash with a method)."""
    return [tag[:64] for tag in (_short_name(model), method, behaviour and f"behaviour:{behaviour}") if tag]


def _artifact_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-.")[:128]


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


# --- mode resolution--------------------------------------------------------------------------------------------

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
        online = api_key_available() and server_reachable(base_url())
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
