"""The dashboard spec checked against what a real tiny job logs offline, and the offline command line."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
from test_pipeline import run, small_job

from cna import tracking
from cna.config import LoggerConfig
from cna.dashboard import Key, dashboard_spec, logged_keys, missing_keys
from cna.dashboard import __main__ as dashboard_command
from cna.dashboard.__main__ import main
from cna.dashboard.spec import config, history, summary
from cna.dashboard.workspace import RunSelection, build_workspace, save_workspace
from cna.errors import ConfigError
from cna.tracking import OfflineRun, read_offline_run

GROUP = "multirun/2026-11-22/12-00-00"


def isolate_wandb(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """No credentials, no server to find, and every wandb folder under `folder`."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DISABLED",
                 "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(folder / "no-netrc"))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(folder / name.lower()))


@pytest.fixture(scope="module")
def tiny_job(tiny_folder, tmp_path_factory) -> tuple[Path, OfflineRun]:
    """One real cna job on the tiny model, logged to an offline W&B run: (run folder, what the run recorded)."""
    folder = tmp_path_factory.mktemp("dashboard")
    # The universal filter off only saves time: its settings are in the logged config either way.
    cfg = small_job(tiny_folder, folder / "cache", "method=cna", "method.k=6", "method.universal.enabled=false")
    cfg.logger = LoggerConfig(name="wandb", project="cna-test", entity=None, mode="offline")
    run_dir = folder / "0_tiny_random_cna"
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_wandb(monkeypatch, folder)
        run(cfg, run_dir, group=GROUP)
        # Flushes the run's last records and stops wandb's service, which would otherwise outlive these
        # environment variables into later tests.
        wandb.teardown()
    return run_dir, read_offline_run(run_dir)


def test_every_panel_key_that_is_not_optional_is_logged_by_a_tiny_job(tiny_job, capsys):
    run_dir, logged_run = tiny_job
    assert logged_run.group == GROUP and logged_run.exit_code == 0
    logged = logged_keys([logged_run])
    spec = dashboard_spec()
    required = [key for key in spec.used_keys() if key not in spec.optional]
    # Not a vacuous check: it covers each source and each panel kind.
    assert {history("refusal_rate"), history("over_refusal/xstest_safe"), summary("kl_divergence"),
            config("method.universal.threshold"), config("model.name"), summary(tracking.FULL_STRENGTH_TABLE),
            history("plots/layer_histogram")} <= set(required)
    assert missing_keys([logged_run]) == []
    assert set(required) <= logged
    # The optional list holds only keys a default job really does not log: anything else belongs in the check.
    assert not set(spec.optional) & logged
    assert main(["--check", str(run_dir)]) == 0
    assert capsys.readouterr().out == "1 W&B run: every dashboard key that is not optional is logged\n"


def test_a_renamed_or_unlogged_key_fails_the_check(tiny_job, capsys):
    run_dir, logged_run = tiny_job
    spec = dashboard_spec()

    def renamed(old: Key, new: Key):
        sections = tuple(dataclasses.replace(section, panels=tuple(
            dataclasses.replace(panel, keys=tuple(new if key == old else key for key in panel.keys))
            for panel in section.panels)) for section in spec.sections)
        return dataclasses.replace(spec, sections=sections)

    assert missing_keys([logged_run], renamed(history("refusal_rate"), history("refusal_rate_keyword"))) == [
        "history:refusal_rate_keyword"]
    assert missing_keys([logged_run], renamed(config("method.universal.threshold"),
                                              config("method.universal_threshold"))) == [
        "config:method.universal_threshold"]
    # The same name from another place: a history metric is not a config key.
    assert missing_keys([logged_run], renamed(summary("quality"), config("quality"))) == ["config:quality"]
    unlogged = history("refusal_rate_judge")
    with_unlogged = renamed(history("degenerate_rate"), unlogged)
    assert missing_keys([logged_run], with_unlogged) == [str(unlogged)]
    # Declared optional, the same key passes; an optional key that no panel reads any more (renamed in the
    # panels only) makes the spec invalid, so the one optional list cannot go stale.
    declared = dataclasses.replace(with_unlogged, optional={**spec.optional, unlogged: "never"})
    assert missing_keys([logged_run], declared) == []
    with pytest.raises(ConfigError, match="history:judge_score"):
        missing_keys([logged_run], renamed(history("judge_score"), history("judge_mean_score")))
    # A job that logs less (here: as if MMLU were switched off) fails the check, naming the key.
    without_mmlu = dataclasses.replace(logged_run, history=[{k: v for k, v in row.items() if k != "mmlu_accuracy"}
                                                        for row in logged_run.history])
    assert missing_keys([without_mmlu]) == ["history:mmlu_accuracy"]
    (run_dir / "no-runs").mkdir(exist_ok=True)
    assert main(["--check", str(run_dir / "no-runs")]) == 2
    assert capsys.readouterr().err.startswith("error: --check: no W&B runs")


def viewspec_keys(viewspec: dict) -> set[str]:
    """Every metric key the saved workspace's panels read, in the spec's `source:name` form."""
    keys: set[str] = set()
    for section in viewspec["section"]["panelBankConfig"]["sections"]:
        for panel in section["panels"]:
            settings = panel["config"]
            keys.update(f"history:{name}" for name in settings.get("metrics", []))
            keys.update(f"history:{name}" for name in settings.get("mediaKeys", []))
            accessors = [settings.get("xAxis"), settings.get("yAxis"),
                         *(column["accessor"] for column in settings.get("columns", []))]
            for accessor in filter(None, accessors):  # "alpha", "summary:quality", "config:method.value.sign"
                source, _, name = accessor.rpartition(":")
                keys.add(f"{source or 'history'}:{name.replace('.value.', '.')}")
            table = re.findall(r'"val": "([^"]+)"', json.dumps(settings.get("panel2Config", {})))
            keys.update(f"summary:{name}" for name in table)
    return keys


def test_offline_command_writes_the_spec_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setattr(dashboard_command, "server_reachable", lambda *a, **k: pytest.fail("no key: no probe"))
    out = tmp_path / "spec.json"
    args = ["--entity", "team", "--project", "cna", "--group", GROUP, "--tags", "cna", "caa", "--report",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and printed.out.count("\n") == 1
    assert printed.out.startswith("no W&B API key") and str(out) in printed.out

    document = json.loads(out.read_text())
    spec = dashboard_spec()
    assert (document["entity"], document["project"], document["group"]) == ("team", "cna", GROUP)
    assert document["dashboard"] == spec.to_dict()
    viewspec = document["workspace_viewspec"]
    sections = viewspec["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == [s.name for s in spec.sections]
    assert [len(s["panels"]) for s in sections] == [len(s.panels) for s in spec.sections]
    # Every panel of the built workspace reads a key of the spec, and every spec panel key is read by one.
    assert viewspec_keys(viewspec) == {str(spec.x_axis), *(str(key) for panel in spec.panels() for key in panel.keys)}
    runset = viewspec["section"]["runSets"][0]
    assert {(f["key"]["name"], json.dumps(f["value"])) for f in runset["filters"]["filters"]} == {
        ("group", json.dumps(GROUP)), ("tags", json.dumps(["cna", "caa"]))}
    assert [g["name"] for g in runset["grouping"]] == ["method.value.name", "model.value.name",
                                                          "behaviour.value.name"]
    assert viewspec["section"]["settings"]["xAxis"] == "alpha"
    assert viewspec["section"]["settings"]["maxRuns"] == spec.max_runs == 100
    assert document["report"]["sections"] == [s.name for s in spec.sections]

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("offline (WANDB_MODE=offline): wrote the dashboard spec")


def test_command_errors_are_one_line(tmp_path, monkeypatch, capsys):
    isolate_wandb(monkeypatch, tmp_path)
    assert main(["--project", "cna", "--out", str(tmp_path / "spec.json")]) == 2
    assert capsys.readouterr().err == "error: --entity: expected the W&B entity (user or team) that owns the project\n"
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)  # as if not installed
    assert main(["--entity", "team", "--out", str(tmp_path / "spec.json")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install 'cna[dashboard]'" in error
    assert not (tmp_path / "spec.json").exists()


def test_saving_again_updates_the_workspace_of_the_same_runs(monkeypatch):
    from wandb_workspaces.workspaces import Workspace, internal

    saved: list[tuple[str, str]] = []
    monkeypatch.setattr(Workspace, "save", lambda self: saved.append((self._internal_name, self._internal_id)))
    monkeypatch.setattr(Workspace, "url", property(lambda self: f"https://wandb.test/?nw={self._internal_name}"))
    on_server: dict[str, str] = {}

    def from_name(entity: str, project: str, name: str):
        if name not in on_server:
            raise ValueError(f"Workspace `{name}` not found in project `{project}`")
        return SimpleNamespace(id=on_server[name])

    monkeypatch.setattr(internal.View, "from_name", from_name)
    selection = RunSelection("team", "cna", GROUP)
    assert save_workspace(build_workspace(selection)) == f"https://wandb.test/?nw={selection.view_name}"
    on_server[selection.view_name] = "VmlldzoxMjM="
    save_workspace(build_workspace(selection))
    assert saved == [(selection.view_name, ""), (selection.view_name, "VmlldzoxMjM=")]  # created, then updated
    assert RunSelection("team", "cna", "multirun/other").view_name != selection.view_name
