"""python -m cna.dashboard --entity E --project P [--group MULTIRUN] [--tags T ...] [--report] [--out FILE]

Builds the comparison workspace (and with --report a report), writes its spec to --out, and saves it to W&B
when an API key is configured and the server answers; otherwise it says why in one line and uploads nothing.
`--check RUN_DIR ...` lists the dashboard keys that no W&B run under RUN_DIR logged (alone, or recorded in the
spec when given with --entity); the exit status is 1 when a key is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cna.dashboard.spec import dashboard_spec, missing_keys
from cna.dashboard.workspace import RunSelection, build_report, build_workspace, save_workspace, viewspec
from cna.errors import CnaError
from cna.network import server_reachable
from cna.tracking import api_key_available, base_url, read_offline_run

DEFAULT_OUT = Path("dashboard_spec.json")


def upload_blocker(offline: bool) -> str | None:
    """Why nothing can be uploaded now, or None. Probes the server only when a key is configured."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if offline or mode in ("offline", "dryrun", "disabled"):
        return "offline (--offline)" if offline else f"offline (WANDB_MODE={mode})"
    if not api_key_available():
        return "no W&B API key (`wandb login` or WANDB_API_KEY)"
    if not server_reachable(base_url()):
        return f"no network: the W&B server {base_url()} does not answer"
    return None


def spec_document(selection: RunSelection, workspace, report, checked: dict | None) -> dict:
    spec = dashboard_spec()
    document = {
        "entity": selection.entity, "project": selection.project, "group": selection.group,
        "tags": list(selection.tags), "workspace": selection.title, "view_name": selection.view_name,
        "dashboard": spec.to_dict(), "workspace_viewspec": viewspec(workspace),
    }
    if report is not None:  # a report's viewspec needs the server (it looks the project up): its outline only
        document["report"] = {"title": report.title, "sections": [section.name for section in spec.sections]}
    if checked is not None:
        document["checked_against"] = checked
    return document


def check(folders: list[Path]) -> dict:
    """The dashboard keys that none of the W&B runs under `folders` logged: {"runs": [names], "missing": [keys]}."""
    files = sorted({file for folder in folders for file in folder.rglob("*.wandb") if file.parent.name != "latest-run"})
    if not files:
        raise CnaError(f"--check: no W&B runs (wandb/*run-*/*.wandb) under {', '.join(map(str, folders))}")
    runs = [read_offline_run(file) for file in files]
    return {"runs": [run.name for run in runs], "missing": missing_keys(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cna.dashboard",
                                     description="The W&B comparison workspace of cna runs, built from one spec.")
    parser.add_argument("--entity", help="W&B entity (user or team) that owns the project")
    parser.add_argument("--project", default="cna", help="W&B project (default: cna, as logger.project)")
    parser.add_argument("--group", help="only the runs of this multirun (its W&B group: the Hydra sweep dir)")
    parser.add_argument("--tags", nargs="+", default=[], help="only runs with any of these tags (model, method)")
    parser.add_argument("--report", action="store_true", help="also create a report with the same panels")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"spec file (default: {DEFAULT_OUT})")
    parser.add_argument("--offline", action="store_true", help="write the spec only, never upload")
    parser.add_argument("--check", type=Path, nargs="+", metavar="RUN_DIR",
                        help="check the dashboard's keys against the W&B runs under these folders (exit 1 if any "
                             "is missing); with --entity, record the result in the spec too")
    args = parser.parse_args(argv)
    try:
        checked = check(args.check) if args.check else None
        if checked is not None:
            missing, count = checked["missing"], len(checked["runs"])
            runs = f"{count} W&B run{'s' if count != 1 else ''}"
            print(f"{runs}: none logs these dashboard keys: {', '.join(missing)}" if missing
                  else f"{runs}: every dashboard key that is not optional is logged")
            if not args.entity:
                return 1 if missing else 0
        if not args.entity:
            raise CnaError("--entity: expected the W&B entity (user or team) that owns the project")
        selection = RunSelection(args.entity, args.project, args.group, tuple(args.tags))
        workspace = build_workspace(selection)
        report = build_report(selection) if args.report else None
    except CnaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(spec_document(selection, workspace, report, checked), indent=1) + "\n",
                        encoding="utf-8")
    failed_check = int(bool(checked and checked["missing"]))
    blocker = upload_blocker(args.offline)
    if blocker:
        print(f"{blocker}: wrote the dashboard spec to {args.out}; nothing uploaded")
        return failed_check
    try:
        print(f"workspace: {save_workspace(workspace)}")
        if report is not None:
            print(f"report: {report.save().url}")
    except Exception as error:  # any server or network failure: one line, the spec is written already
        print(f"error: saving to W&B failed ({type(error).__name__}: {error}); the spec is in {args.out}",
              file=sys.stderr)
        return 1
    return failed_check


if __name__ == "__main__":
    sys.exit(main())
