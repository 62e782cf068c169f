"""`python launch.py -m` through every launcher preset: a two-job tiny-model multirun, both jobs' results found."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import data_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny_random", "logger=none", "eval.refusal.n=2", "eval.over_refusal.jbb_benign.n=2",
         "eval.over_refusal.xstest_safe.n=0", "eval.mmlu.n=2", "eval.kl.n=2", "prompts.n_positive=4",
         "prompts.n_negative=4", "max_new_tokens=2", "alphas=[0.0,1.0]"]


def launch(tmp_path: Path, tiny_folder: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "CNA_TINY_MODEL": str(tiny_folder), "CNA_DATA_DIR": str(data_dir()),
           "CNA_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    flags = ["-m"] if multirun else []
    return subprocess.run([sys.executable, "launch.py", *flags, *SMALL, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("launcher", ["local", "parallel", "submitit_cpu", "ray_local"])
def test_a_two_job_multirun_finishes_both_jobs(tiny_folder, tmp_path, launcher):
    sweep = tmp_path / "multirun"
    done = launch(tmp_path, tiny_folder, f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", "method=cna,caa",
                  multirun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 2
    finished = {json.loads(path.read_text())["method"]: json.loads(path.read_text())["status"] for path in results}
    assert finished == {"cna": "complete", "caa": "complete"}
    # Job number, model and method name each job's folder: re-running the sweep into it resumes every job.
    assert {path.parent.name for path in results} == {"0_tiny_random_cna", "1_tiny_random_caa"}


def test_a_bad_value_stops_the_run_with_one_line(tiny_folder, tmp_path):
    done = launch(tmp_path, tiny_folder, "method.k_fraction=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: method.k_fraction: expected a number in (0, 1], got 2"
    assert not (tmp_path / "run" / "results.json").exists()


def test_recipe_search_runs_optuna_trials_and_writes_a_pareto_front(tiny_folder, tmp_path):
    sweep = tmp_path / "search"
    done = launch(tmp_path, tiny_folder, "experiment=recipe_search", f"hydra.sweep.dir={sweep}",
                  "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.population_size=3",
                  "knobs.first_layer=choice(0,1)", "eval.refusal.n=2", "eval.kl.n=2", "max_new_tokens=2",
                  "search.min_quality=0", multirun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.rglob("results.json"))) == 3
    front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert front["name"] == "optuna" and front["solutions"]
    for solution in front["solutions"]:
        refusal, kl = solution["values"]
        assert 0 <= refusal <= 1 and kl >= 0
        assert set(solution["params"]) >= {"method.k_fraction", "method.sign", "knobs.strength", "knobs.first_layer"}


def test_a_failed_job_is_recorded_and_the_multirun_goes_on(tiny_folder, tmp_path):
    sweep = tmp_path / "multirun"
    # The second job asks for more neurons than the tiny model has (3 layers x 128): bad input inside a sweep.
    done = launch(tmp_path, tiny_folder, f"hydra.sweep.dir={sweep}", "method.k=999,4", multirun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reason = "method.k: expected at most 384 (the MLP neurons in 3 layers x 128 of tiny-random), got 999"
    assert f"error: {reason}" in done.stderr.splitlines()
    failed = json.loads((sweep / "0_tiny_random_cna" / "results.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == reason and failed["points"] == []
    finished = json.loads((sweep / "1_tiny_random_cna" / "results.json").read_text())
    assert finished["status"] == "complete" and len(finished["points"]) == 2


def test_a_failed_search_trial_scores_as_infeasible_and_the_study_goes_on(tiny_folder, tmp_path):
    from cna.pipeline import INFEASIBLE

    sweep = tmp_path / "search"
    done = launch(tmp_path, tiny_folder, "experiment=recipe_search", f"hydra.sweep.dir={sweep}",
                  "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.population_size=2",
                  "knobs.first_layer=choice(5,7)", multirun=True)  # 3 layers in the tiny model: every trial fails
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [json.loads(path.read_text()) for path in sweep.rglob("results.json")]
    assert len(trials) == 2 and all(t["status"] == "failed" and "method.layers" in t["error"] for t in trials)
    front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert all(solution["values"] == [3 * INFEASIBLE] * 2 for solution in front["solutions"])
