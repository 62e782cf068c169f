"""The W&B layer, checked by reading back what an offline run recorded (no network, no API key)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from cna import tracking
from cna.config import LoggerConfig
from cna.run_folder import JobResults, Point
from cna.tracking import NullTracker, WandbTracker, point_metrics, read_offline_run, resolve_mode, wandb_run

POINTS = [
    {"alpha": 0.0, "multiplier": 1.0, "refusal_rate": 0.9, "refusal_ci95": [0.82, 0.95], "quality": 0.97,
     "quality_ci95": [0.95, 0.99], "degenerate_rate": 0.0, "n_prompts": 20, "over_refusal_rate": 0.1,
     "over_refusal_ci95": [0.03, 0.25], "over_refusal": {"xstest": {"rate": 0.1, "ci95": [0.03, 0.25], "n": 10}},
     "mmlu_accuracy": 0.5, "mmlu_ci95": [0.4, 0.6], "kl_divergence": 0.0},
    {"alpha": 0.5, "multiplier": 0.5, "refusal_rate": 0.45, "refusal_ci95": [0.3, 0.6], "quality": 0.9,
     "quality_ci95": [0.85, 0.95], "degenerate_rate": 0.05, "n_prompts": 20, "over_refusal_rate": None,
     "over_refusal_ci95": None, "over_refusal": {}, "mmlu_accuracy": None, "mmlu_ci95": None,
     "kl_divergence": 0.12},
    {"alpha": 1.0, "multiplier": 0.0, "refusal_rate": 0.05, "refusal_ci95": [0.01, 0.2], "quality": 0.8,
     "quality_ci95": [0.7, 0.9], "degenerate_rate": 0.15, "n_prompts": 20, "over_refusal_rate": 0.0,
     "over_refusal_ci95": [0.0, 0.3], "over_refusal": {"xstest": {"rate": 0.0, "ci95": [0.0, 0.3], "n": 10}},
     "mmlu_accuracy": 0.45, "mmlu_ci95": [0.35, 0.55], "kl_divergence": None},
]


CONFIG = {"model": {"name": "org/tiny-model", "dtype": "float32"}, "method": {"name": "cna", "k_fraction": 0.001},
          "seed": 0, "alphas": [0.0, 0.5, 1.0]}


def make_tracker(run_dir: Path, group: str | None = None, **logger):
    settings = {"name": "wandb", "project": "cna-test", "entity": None, "mode": "auto", **logger}
    return tracking.make_tracker(LoggerConfig(**settings), run_dir=run_dir, group=group, model="org/tiny-model",
                                 method="cna", config=CONFIG)


def results(points: list[dict], **fields) -> JobResults:
    return JobResults.from_dict({"model": "org/tiny-model", "method": "cna", "points": points, **fields})


def records(alpha: float) -> list[dict]:
    return [{"alpha": alpha, "set": "jbb", "prompt": f"how do I {i}?", "response": "I can't help" if i else "Sure",
             "refused": bool(i), "quality": 1.0 - 0.1 * i} for i in range(2)]


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No credentials, WANDB_MODE=offline, and every wandb folder under tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DISABLED", "WANDB_DIR",
                 "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return tmp_path / "outputs" / "12-00-00_tiny_cna"


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("cna.tracking") and r.levelno >= logging.WARNING]


def write_circuit(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "circuit.json"
    path.write_text(json.dumps({
        "model": "org/tiny-model", "method": "cna", "k": 2, "k_fraction": 0.001,
        "neurons": [{"layer": 0, "index": 3, "delta": 1.5}, {"layer": 1, "index": 7, "delta": -0.5}],
        "universal_removed": 1, "layer_counts": {"0": 1, "1": 1}, "n_layers": 2, "neurons_per_layer": 64,
        "prompts": {"positive": 8, "negative": 8, "sha256": "ab" * 32}}), encoding="utf-8")
    return path


def write_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def test_offline_run_records_points_summary_config_circuit_and_generations(offline, caplog):
    run_dir = offline
    circuit = write_circuit(run_dir)
    tracker = make_tracker(run_dir, group="2026-01-01/12-00-00")
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
    tracker.log_circuit(circuit)
    for point in POINTS:
        tracker.log_point(Point.from_dict(point))
        tracker.log_generations(records(point["alpha"]))
    tracker.log_images({"refusal_vs_alpha": write_png(run_dir / "refusal.png")})
    finished = results(POINTS, status="complete", config_sha256="cd" * 32,
                       timings_s={"discovery": 1.5, "generation": 3.25})
    with caplog.at_level(logging.WARNING, logger="cna.tracking"):
        tracker.finish(finished)
    assert not tracking_warnings(caplog)
    assert (run_dir / "wandb").is_dir()

    run = read_offline_run(run_dir)
    assert run.path.parent.parent == run_dir / "wandb"
    assert (run.name, run.group, run.job_type, run.project) == (run_dir.name, "2026-01-01/12-00-00", "cna",
                                                                "cna-test")
    assert set(run.tags) == {"tiny-model", "cna"}
    assert run.config["model"]["name"] == "org/tiny-model"
    assert run.config["method"] == {"name": "cna", "k_fraction": 0.001}
    assert run.exit_code == 0

    rows = [row for row in run.history if "refusal_rate" in row]
    assert [row["alpha"] for row in rows] == [0.0, 0.5, 1.0]
    assert [row["refusal_rate"] for row in rows] == [p["refusal_rate"] for p in POINTS]
    first, second, last = rows
    assert (first["refusal_ci95_low"], first["refusal_ci95_high"]) == (0.82, 0.95)
    assert first["over_refusal/xstest"] == 0.1 and first["over_refusal/xstest_n"] == 10
    assert "mmlu_accuracy" not in second and "over_refusal_rate" not in second  # None is skipped
    assert "kl_divergence" not in last and last["multiplier"] == 0.0
    assert any("plots/refusal_vs_alpha" in row for row in run.history)

    summary = run.summary
    assert summary["refusal_rate"] == POINTS[-1]["refusal_rate"] == 0.05
    assert "kl_divergence" not in summary  # None at the last point: not the value of an earlier one
    assert summary["status"] == "complete" and summary["n_points"] == 3
    assert summary["timings_s/generation"] == 3.25 and summary["circuit/k"] == 2
    assert summary["generations"]["_type"] == "table-file"
    assert summary["generations"]["nrows"] == 6
    assert summary[tracking.FULL_STRENGTH_TABLE]["nrows"] == 2  # the rows at alpha = 1

    circuits = [a for a in run.artifacts if a["type"] == "circuit"]
    assert len(circuits) == 1 and circuits[0]["files"] == ["circuit.json"]
    assert circuits[0]["metadata"]["k"] == 2 and "neurons" not in circuits[0]["metadata"]
    assert any(a["type"] == "run_table" and a["name"].endswith("generations") for a in run.artifacts)
    table = json.loads((run.path.parent / "files" / summary["generations"]["path"]).read_text())
    assert table["columns"] == list(tracking.GENERATION_COLUMNS)
    assert [row[0] for row in table["data"]] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


def test_failed_job_has_failed_status_and_exit_code(offline):
    tracker = make_tracker(offline, mode="offline")
    tracker.log_point(Point.from_dict(POINTS[0]))
    tracker.finish(results(POINTS[:1], status="running"), failed=True)
    tracker.finish(results(POINTS[:1], status="running"), failed=True)  # a second call does nothing
    run = read_offline_run(offline)
    assert run.exit_code == 1
    assert run.summary["status"] == "failed" and run.summary["refusal_rate"] == 0.9
    assert run.group == ""


def test_logger_none_does_nothing(offline):
    tracker = make_tracker(offline, name="none")
    assert type(tracker) is NullTracker
    tracker.log_circuit(offline / "circuit.json")  # missing: not even read
    tracker.log_point(Point.from_dict(POINTS[0]))
    tracker.log_generations(records(0.0))
    tracker.log_images({"plot": offline / "missing.png"})
    tracker.finish(results(POINTS))
    assert not (offline / "wandb").exists()


def test_wandb_disabled_gives_the_null_tracker(offline, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert type(make_tracker(offline, mode="online")) is NullTracker
    assert not offline.exists()


def test_wandb_init_failure_is_one_warning(offline, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken)
    with caplog.at_level(logging.WARNING, logger="cna.tracking"):
        tracker = make_tracker(offline)
        tracker.log_circuit(write_circuit(offline))
        tracker.log_point(Point.from_dict(POINTS[0]))
        tracker.finish(results(POINTS[:1]))
    assert isinstance(tracker, NullTracker)
    warned = tracking_warnings(caplog)
    assert len(warned) == 1 and "no service" in warned[0]


def test_online_start_failure_falls_back_to_offline(offline, monkeypatch, caplog):
    import wandb

    real_init = wandb.init

    def no_server(*args, mode=None, **kwargs):
        if mode == "online":
            raise ConnectionError("api.wandb.ai unreachable")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb, "init", no_server)
    with caplog.at_level(logging.WARNING, logger="cna.tracking"):
        tracker = make_tracker(offline, mode="online")
        assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
        tracker.log_point(Point.from_dict(POINTS[0]))
        tracker.finish(results(POINTS[:1], status="complete"))
    warned = tracking_warnings(caplog)
    assert len(warned) == 1 and "offline instead" in warned[0]
    assert [row["alpha"] for row in read_offline_run(offline).history] == [0.0]


def test_failure_mid_run_is_one_warning_then_nothing(offline, caplog):
    tracker = make_tracker(offline)
    tracker.log_point(Point.from_dict(POINTS[0]))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    tracker.run.log = broken
    with caplog.at_level(logging.WARNING, logger="cna.tracking"):
        tracker.log_point(Point.from_dict(POINTS[1]))
        tracker.log_point(Point.from_dict(POINTS[2]))
        tracker.log_generations(records(1.0))
        tracker.finish(results(POINTS))
    assert tracker.run is None
    warned = tracking_warnings(caplog)
    assert len(warned) == 1 and "disk full" in warned[0]
    assert read_offline_run(offline).exit_code == 1  # closed as failed, with what it had


def test_point_metrics_flattens_scalars_and_skips_none():
    metrics = point_metrics(POINTS[1])
    assert metrics == {"alpha": 0.5, "multiplier": 0.5, "refusal_rate": 0.45, "refusal_ci95_low": 0.3,
                       "refusal_ci95_high": 0.6, "quality": 0.9, "quality_ci95_low": 0.85, "quality_ci95_high": 0.95,
                       "degenerate_rate": 0.05, "n_prompts": 20, "kl_divergence": 0.12}
    assert point_metrics(POINTS[0])["over_refusal/xstest_ci95_high"] == 0.25


# --- mode resolution --------------------------------------------------------------------------------------------

@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_auto_without_api_key_is_offline(no_credentials, monkeypatch):
    monkeypatch.setattr(wandb_run, "server_reachable", lambda *a, **k: pytest.fail("no key: no network probe"))
    assert not tracking.api_key_available()
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "offline"  # with a warning, never a login prompt
    assert resolve_mode("disabled") == "disabled"


def test_auto_with_api_key_needs_a_reachable_server(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert resolve_mode("auto") == "online"
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        assert resolve_mode("auto") == "offline"


def test_netrc_entry_counts_as_api_key(no_credentials):
    no_credentials.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    no_credentials.chmod(0o600)
    assert tracking.api_key_available()
    assert not tracking.api_key_available("https://wandb.example.org")


def test_wandb_mode_environment_wins(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("disabled") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert resolve_mode("online") == "disabled"


def test_the_neuron_cards_are_one_table_with_a_row_per_neuron(offline, caplog):
    rows = [{"neuron": f"L{layer}/N{index}", "layer": layer, "index": index, "rank": rank, "score": 1.0 / rank,
             "selection_frequency": None if layer else 0.9, "promoted": "`sorry`, `cannot`",
             "effect_patched": None} for rank, (layer, index) in enumerate([(0, 3), (1, 7)], start=1)]
    tracker = make_tracker(offline, mode="offline")
    tracker.log_neurons(rows)
    tracker.log_neurons([])  # nothing to log: no empty table replaces the first
    with caplog.at_level(logging.WARNING, logger="cna.tracking"):
        tracker.finish(results([], status="complete"))
    assert not tracking_warnings(caplog)
    summary = read_offline_run(offline).summary
    assert summary[tracking.NEURON_TABLE]["_type"] == "table-file" and summary[tracking.NEURON_TABLE]["nrows"] == 2
    run = read_offline_run(offline)
    table = json.loads((run.path.parent / "files" / summary[tracking.NEURON_TABLE]["path"]).read_text())
    assert table["columns"] == list(rows[0])
    assert [row[:3] for row in table["data"]] == [["L0/N3", 0, 3], ["L1/N7", 1, 7]]
    NullTracker().log_neurons(rows)  # the base interface takes them too
