"""Experiment tracking: Weights & Biases for one job, and reading an offline run back.

- `tracker`: what the pipeline reports (`Tracker`, the do-nothing `NullTracker`) and the flat values it logs;
- `wandb_run`: the W&B tracker, its mode (online, offline, disabled) and credentials; it never fails a job;
- `offline_log`: an offline run's transaction log read back (history, summary, config, artifacts).
"""

from cna.tracking.offline_log import OfflineRun, offline_run_files, read_offline_run
from cna.tracking.tracker import (
    FULL_STRENGTH_TABLE,
    GENERATION_COLUMNS,
    NEURON_TABLE,
    NullTracker,
    Tracker,
    point_metrics,
    summary_values,
)
from cna.tracking.wandb_run import MODES, WandbTracker, api_key_available, base_url, make_tracker, resolve_mode

__all__ = ["FULL_STRENGTH_TABLE", "GENERATION_COLUMNS", "MODES", "NEURON_TABLE", "NullTracker", "OfflineRun", "Tracker",
           "WandbTracker", "api_key_available", "base_url", "make_tracker", "offline_run_files", "point_metrics",
           "read_offline_run", "resolve_mode", "summary_values"]
