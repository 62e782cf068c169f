"""Judge the generations of finished runs after the fact, and rewrite their results.

    python -m cna.judge RUN_OR_MULTIRUN_DIR eval.judge=strongreject [eval.judge.KEY=VALUE ...]
    python -m cna.judge multirun/2026-11-22/10-00-00 eval.judge=strongreject eval.judge.backend=openai \\
        eval.judge.base_url=http://127.0.0.1:8000/v1 eval.judge.model=meta-llama/Llama-3.3-70B-Instruct

Every `generations.jsonl` under the folder is judged (verdicts come from the on-disk cache when the
same judge has seen the same pair before); its lines gain the verdicts and its `results.json` points the
judge's fields, both rewritten atomically. The overrides are the job config's (`eval/judge=NAME` or
`eval.judge=NAME` picks the judge; `cache_dir=...` moves the verdict cache).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cna.config import compose_job, judge_group_overrides
from cna.errors import CnaError, ConfigError
from cna.evaluation.judges import Judge, JudgeConfig, JudgeMetric, describe, judge_point, make_judge
from cna.io import write_json_atomic, write_text_atomic
from cna.report import run_plots
from cna.run_folder import GENERATIONS, RESULTS, JobResults, Point
from cna.schema import check_settings

log = logging.getLogger(__name__)


def compose_judge(overrides: list[str]) -> JudgeConfig:
    """The judge settings that `overrides` give the job config, checked; ConfigError on anything wrong."""
    judge = compose_job(judge_group_overrides(overrides)).eval.metrics["judge"]
    check_settings(judge, "eval.judge")
    JudgeMetric.check(judge)
    if judge.name == "none":
        raise ConfigError("eval.judge: expected one of yesno, strongreject, rating (e.g. eval.judge=strongreject), "
                          "got 'none'")
    return judge


def run_folders(folder: Path) -> list[Path]:
    """Every folder at or below `folder` holding both a results.json and a generations.jsonl."""
    found = sorted(p.parent for p in Path(folder).rglob(RESULTS) if (p.parent / GENERATIONS).is_file())
    if not found:
        raise CnaError(f"no {RESULTS} with a {GENERATIONS} beside it in {folder} or below")
    return found


def rejudge_run(run_dir: Path, judge: Judge, description: dict) -> JobResults:
    """Judge one run's generations; rewrite its generations.jsonl and results.json; return the results."""
    results = JobResults.from_dict(json.loads((run_dir / RESULTS).read_text(encoding="utf-8")))
    lines = (run_dir / GENERATIONS).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    by_alpha: dict[float, list[dict]] = defaultdict(list)
    for record in records:
        by_alpha[record["alpha"]].append(record)
    started = time.perf_counter()
    for i, point in enumerate(results.points):
        if by_alpha.get(point.alpha):
            values = point.to_dict()
            judge_point(judge, values, by_alpha[point.alpha])
            results.points[i] = Point.from_dict(values)
    results.extra["judge"] = description
    results.timings_s["judge"] = round(time.perf_counter() - started, 3)
    write_text_atomic(run_dir / GENERATIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json_atomic(run_dir / RESULTS, results.to_dict())
    try:
        run_plots(run_dir)  # judge_vs_keyword.png beside the run's other figures
    except Exception as error:  # noqa: BLE001 - a plotting problem never undoes the judging
        log.warning("plots for %s failed: %s", run_dir, error)
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def transformers_server(model: str | Path, *, port: int | None = None, ready_within_s: float = 90,
                        log_path: str | Path | None = None) -> Iterator[str]:
    """`transformers serve MODEL` on 127.0.0.1 (needs `pip install 'transformers[serving]'`); yields its /v1 URL.

    Waits for /health until `ready_within_s`, and always stops the server on leaving the block.
    """
    command = shutil.which("transformers", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if command is None:
        raise CnaError("no `transformers` command: pip install 'transformers[serving]'")
    port = port or free_port()
    log_file = open(log_path or os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen([command, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                               str(model)], stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + ready_within_s
        while True:
            if server.poll() is not None:
                raise CnaError(f"transformers serve exited with code {server.returncode} before it was ready"
                               + (f"; see {log_path}" if log_path else ""))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CnaError(f"transformers serve was not ready within {ready_within_s:g} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log_file.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cna.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run folder, or an outputs/multirun folder holding many")
    parser.add_argument("overrides", nargs="*", help="job-config overrides, e.g. eval.judge=strongreject")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = compose_judge(args.overrides)
        folders = run_folders(args.folder)
        judge = make_judge(settings)
        for run_dir in folders:
            asked, hits = judge.questions_asked, judge.cache.hits if judge.cache else 0
            results = rejudge_run(run_dir, judge, describe(settings))
            rates = ", ".join(f"alpha {p.alpha:g}: {p.value('judge_refusal_rate')}" for p in results.points)
            failures = sum(p.value("judge_parse_failures", 0) for p in results.points)
            print(f"{run_dir}: judge refusal {rates}; unreadable {failures}; "
                  f"{judge.questions_asked - asked} questions asked, "
                  f"{(judge.cache.hits if judge.cache else 0) - hits} cached; {results.timings_s['judge']:.1f} s")
    except CnaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
