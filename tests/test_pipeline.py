"""A whole job on the tiny random model with the real data files: contract files, resume, statistics cache."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cna import pipeline
from cna.config import JobConfig, SearchConfig, SweepConfig, compose_job
from cna.pipeline import INFEASIBLE, search_objectives
from cna.run_folder import CIRCUIT, GENERATIONS, POINT_FIELDS, RESULTS, RESULTS_FIELDS, JobResults
from conftest import data_dir


def small_job(tiny_folder: Path, cache: Path, *overrides: str) -> JobConfig:
    return compose_job([
        "model=tiny_random", f"model.path={tiny_folder}", f"data_dir={data_dir()}", f"cache_dir={cache}",
        "logger=none", "eval.refusal.n=4", "eval.over_refusal.jbb_benign.n=3", "eval.over_refusal.xstest_safe.n=2",
        "eval.mmlu.n=5", "eval.kl.n=3", "prompts.n_positive=6", "prompts.n_negative=6", "max_new_tokens=4",
        "batch_size=4", "alphas=[0.0,1.0]", *overrides])


def run(job: JobConfig, run_dir: Path, **kwargs) -> dict:
    """A job's results as its results.json holds them."""
    return pipeline.run(job, run_dir, **kwargs).to_dict()


def generation_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / GENERATIONS).read_text().splitlines()]


@pytest.mark.parametrize("method", ["cna", "caa", "direction", "random"])
def test_a_job_writes_the_output_contract(tiny_folder, tmp_path, method):
    neurons = ["method.k=6"] if method in ("cna", "random") else []
    cfg = small_job(tiny_folder, tmp_path / "cache", f"method={method}", *neurons)
    results = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert saved == results and saved["status"] == "complete" and set(saved) >= set(RESULTS_FIELDS)
    assert saved["model"] == "tiny-random" and saved["method"] == method
    assert [p["alpha"] for p in saved["points"]] == [0.0, 1.0]
    for point in saved["points"]:
        assert set(point) >= set(POINT_FIELDS) and point["n_prompts"] == 4
        assert point["mmlu_accuracy"] is not None and point["kl_divergence"] is not None
        assert set(point["over_refusal"]) == {"jbb_benign", "xstest_safe"}
    assert saved["points"][0]["kl_divergence"] == 0.0  # alpha = 0 is the unsteered model
    assert saved["kl_direction"] == "steered||unsteered"  # kl_divergence is KL(steered || unsteered)
    assert {"data", "load_model", "discovery", "generation", "mmlu"} <= set(saved["timings_s"])
    circuit = json.loads((tmp_path / "run" / CIRCUIT).read_text())
    assert circuit["method"] == method
    if method in ("cna", "random"):
        assert circuit["k"] == 6 and len(circuit["neurons"]) == 6
        assert saved["points"][1]["multiplier"] == 0.0
    else:
        assert "neurons" not in circuit and circuit["vector_norm"] > 0
        assert saved["points"][1]["multiplier"] is None
    assert (tmp_path / "run" / "refusal_quality_vs_alpha.png").read_bytes().startswith(b"\x89PNG")
    lines = generation_lines(tmp_path / "run")
    assert len(lines) == 2 * (4 + 3 + 2)
    assert {"alpha", "prompt", "response", "refused", "quality"} <= set(lines[0])


def test_discovery_prompts_are_deduplicated_against_the_evaluation_sets(tiny_folder, tmp_path):
    cfg = small_job(tiny_folder, tmp_path / "cache", "prompts.n_positive=null", "alphas=[0.0]")
    run(cfg, tmp_path / "run")
    prompts = json.loads((tmp_path / "run" / CIRCUIT).read_text())["prompts"]
    # harmful_train.json: 260 prompts, 1 exact and about 12 near copies of JBB goals.
    assert 8 <= prompts["duplicates_removed"]["positive"] <= 20
    assert prompts["positive"] == 260 - prompts["duplicates_removed"]["positive"]


def test_a_causal_score_ranks_the_circuit_and_its_gradients_are_cached_apart(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    attribution = run(small_job(tiny_folder, cache, "method.k=6", "method.score=attribution", "alphas=[1.0]"),
                      tmp_path / "attribution")
    # diverse, positive, negative, positive gradients, and the per-prompt values of the best neurons (cna.neurons)
    assert attribution["cache"] == {"hits": 0, "misses": 5}
    circuit = json.loads((tmp_path / "attribution" / CIRCUIT).read_text())
    assert circuit["score"] == "attribution" and circuit["settings"]["refusal_starts"]
    magnitudes = [abs(n["score"]) for n in circuit["neurons"]]  # sign abs, the default
    assert magnitudes == sorted(magnitudes, reverse=True) and min(magnitudes) > 0
    # The activation statistics do not depend on the score: a projection job records only its best neurons' values.
    projection = run(small_job(tiny_folder, cache, "method.k=6", "method.score=projection", "alphas=[1.0]"),
                     tmp_path / "projection")
    assert projection["cache"] == {"hits": 3, "misses": 1}
    circuit = json.loads((tmp_path / "projection" / CIRCUIT).read_text())
    assert circuit["score"] == "projection" and circuit["settings"]["direction_layer"] == 1  # half of 3 layers


def test_a_complete_job_is_skipped_and_a_half_done_one_finishes(tiny_folder, tmp_path):
    cfg = small_job(tiny_folder, tmp_path / "cache", "alphas=[0.0,0.5,1.0]")
    run_dir = tmp_path / "run"
    complete = run(cfg, run_dir)
    # A second run of the same config does nothing.
    stamp = (run_dir / RESULTS).stat().st_mtime_ns
    assert run(cfg, run_dir) == complete and (run_dir / RESULTS).stat().st_mtime_ns == stamp
    # Simulate a job killed while evaluating alpha = 1: its results stop after alpha = 0.5 and
    # generations.jsonl holds some lines of the unfinished point.
    results = json.loads((run_dir / RESULTS).read_text())
    results["points"], results["status"] = results["points"][:2], "running"
    (run_dir / RESULTS).write_text(json.dumps(results))
    kept = [line for line in generation_lines(run_dir) if line["alpha"] != 1.0]
    unfinished = [line for line in generation_lines(run_dir) if line["alpha"] == 1.0][:3]
    (run_dir / GENERATIONS).write_text("".join(json.dumps(line) + "\n" for line in kept + unfinished))
    resumed = run(cfg, run_dir)
    assert resumed["status"] == "complete" and [p["alpha"] for p in resumed["points"]] == [0.0, 0.5, 1.0]
    assert resumed["points"][:2] == complete["points"][:2]
    assert len(generation_lines(run_dir)) == 3 * 9
    # A changed config is a different job: it runs again from scratch.
    changed = run(small_job(tiny_folder, tmp_path / "cache", "alphas=[0.0,1.0]"), run_dir)
    assert [p["alpha"] for p in changed["points"]] == [0.0, 1.0]


def test_a_k_sweep_reuses_the_cached_statistics(tiny_folder, tmp_path):
    first = run(small_job(tiny_folder, tmp_path / "cache", "method.k=3", "alphas=[0.0]"), tmp_path / "a")
    second = run(small_job(tiny_folder, tmp_path / "cache", "method.k=9", "method.universal.threshold=0.6",
                           "alphas=[0.0]"), tmp_path / "b")
    # positive, negative, diverse, and the best neurons' per-prompt values for the cards (cna.neurons)
    assert first["cache"] == {"hits": 0, "misses": 4}
    # Another k reads its cards from the same pool of best neurons (the filter at 0.6 flags what it flags at 0.8 on
    # this model, so the pool is the same).
    assert second["cache"] == {"hits": 4, "misses": 0}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    changed_prompts = run(small_job(tiny_folder, tmp_path / "cache", "prompts.n_positive=5", "alphas=[0.0]"),
                          tmp_path / "c")
    assert changed_prompts["cache"] == {"hits": 2, "misses": 2}


def test_what_reaches_wandb_equals_results_json(tiny_folder, tmp_path, monkeypatch):
    from cna.tracking import read_offline_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = small_job(tiny_folder, tmp_path / "cache", "logger=wandb", "logger.mode=auto", "alphas=[0.0,0.5,1.0]")
    results = run(cfg, tmp_path / "run", group="multirun/test")
    offline = read_offline_run(tmp_path / "run")  # no key: the run went offline by itself
    points = [row for row in offline.history if "refusal_rate" in row]
    assert [row["alpha"] for row in points] == [p["alpha"] for p in results["points"]]
    for row, point in zip(points, results["points"], strict=True):
        for key in ("refusal_rate", "quality", "kl_divergence", "mmlu_accuracy", "over_refusal_rate"):
            assert row[key] == pytest.approx(point[key])
    assert offline.summary["refusal_rate"] == pytest.approx(results["points"][-1]["refusal_rate"])
    assert offline.group == "multirun/test" and offline.job_type == "cna"
    assert offline.config["model"]["name"] == "tiny-random"
    assert any(artifact.get("type") == "circuit" for artifact in offline.artifacts)


def test_search_objectives_are_read_at_the_strongest_point_and_penalised_below_the_quality_floor():
    def searching(objectives, min_quality=None):
        return SimpleNamespace(sweep=SweepConfig(search=SearchConfig(objectives, min_quality)))

    points = [{"alpha": 1.0, "refusal_rate": 0.25, "kl_divergence": 0.1, "quality": 0.99},
              {"alpha": 0.0, "refusal_rate": 0.5, "kl_divergence": 0.0, "quality": 0.99}]
    results = JobResults.from_dict({"model": "m", "method": "cna", "points": points})
    both = searching(["refusal_rate", "kl_divergence"], 0.97)
    assert search_objectives(results, both) == [0.25, 0.1]
    results.points[0].quality = 0.87  # 0.1 short of the floor: dominated by every feasible point
    penalised = search_objectives(results, both)
    assert penalised == pytest.approx([0.25 + INFEASIBLE * 1.1, 0.1 + INFEASIBLE * 1.1])
    assert search_objectives(results, searching(["refusal_rate"])) == [0.25]  # no floor


def test_in_sample_discovery_is_recorded_everywhere(tiny_folder, tmp_path):
    """The paper's Table 3 setting (discovery on the JBB goals it evaluates) is flagged, with the overlap."""
    cfg = small_job(tiny_folder, tmp_path / "cache", "prompts=jbb_in_sample", "prompts.n_positive=null",
                    "prompts.n_negative=null", "alphas=[0.0]")
    results = run(cfg, tmp_path / "in")
    circuit = json.loads((tmp_path / "in" / CIRCUIT).read_text())
    assert results["in_sample"] is True and circuit["prompts"]["in_sample"] is True
    # All 4 evaluated harmful goals and all 3 benign ones are among the 200 discovery prompts.
    assert results["discovery_overlap"]["jbb_harmful"] >= 4 and results["discovery_overlap"]["jbb_benign"] >= 3
    assert circuit["prompts"]["overlap"] == results["discovery_overlap"]
    assert circuit["prompts"]["positive"] == 100 and circuit["prompts"]["negative"] == 100
    held_out = run(small_job(tiny_folder, tmp_path / "cache", "prompts=paper_appendix", "prompts.n_positive=null",
                             "prompts.n_negative=null", "alphas=[0.0]"),
                   tmp_path / "out")
    assert held_out["in_sample"] is False and not any(held_out["discovery_overlap"].values())
    assert json.loads((tmp_path / "out" / CIRCUIT).read_text())["prompts"]["positive"] == 8


def test_fraction_layer_ranges_reach_the_circuit(tiny_folder, tmp_path):
    cfg = small_job(tiny_folder, tmp_path / "cache", "method.k=4", "method.layers=[0.5,1.0]", "alphas=[0.0]")
    run(cfg, tmp_path / "run")
    circuit = json.loads((tmp_path / "run" / CIRCUIT).read_text())
    n_layers = circuit["n_layers"]
    assert circuit["settings"]["layers_requested"] == [0.5, 1.0]
    assert circuit["settings"]["layers"] == [n_layers // 2, n_layers]
    assert all(n["layer"] >= n_layers // 2 for n in circuit["neurons"])


def test_the_unsteered_point_is_computed_once_and_reused_identically(tiny_folder, tmp_path):
    first = run(small_job(tiny_folder, tmp_path / "cache", "method.k=3"), tmp_path / "a")
    # Another recipe and another method: the alpha = 0 point does not depend on either.
    second = run(small_job(tiny_folder, tmp_path / "cache", "method=caa"), tmp_path / "b")
    computed = run(small_job(tiny_folder, tmp_path / "cache", "method=caa", "reuse_baseline=false"), tmp_path / "c")
    assert "reused" not in first["points"][0] and "reused" not in computed["points"][0]
    reused = second["points"][0]
    assert reused.pop("reused") is True
    assert reused == computed["points"][0]
    assert reused == {**first["points"][0], "multiplier": None}  # CNA's m = 1 is CAA's no multiplier
    assert second["points"][1] == computed["points"][1]  # KL against the cached reference is the same number
    assert len(list((tmp_path / "cache" / "baselines").glob("*.kl.safetensors"))) == 1
    baseline_lines = [[line for line in generation_lines(tmp_path / d) if line["alpha"] == 0.0] for d in "abc"]
    assert baseline_lines[0] == baseline_lines[1] == baseline_lines[2]
    assert "generation" not in second["timings_s"] or second["timings_s"]["generation"] < computed["timings_s"][
        "generation"]
    # A different evaluation is a different baseline.
    other = run(small_job(tiny_folder, tmp_path / "cache", "eval.refusal.n=5"), tmp_path / "d")
    assert "reused" not in other["points"][0]


def test_generalisation_sets_drop_discovery_copies_and_are_scored_per_set(tiny_folder, tmp_path):
    cfg = small_job(tiny_folder, tmp_path / "cache", "prompts=jbb_in_sample", "prompts.n_positive=null",
                    "prompts.n_negative=null", "eval.refusal.n=0", "eval.mmlu.n=0",
                    f"+eval.generalisation.advbench={{source: {{path: {data_dir()}/advbench/harmful_behaviors.csv, "
                    "column: goal}, n: 5}")
    results = run(cfg, tmp_path / "run")
    # AdvBench holds about 27 near copies of JBB goals; discovery here is on the JBB goals themselves.
    assert 20 <= results["generalisation_removed"]["advbench"] <= 40
    assert results["discovery_overlap"]["advbench"] == 0
    for point in results["points"]:
        assert point["refusal_rate"] is None and point["n_prompts"] == 0  # the refusal set is off
        assert set(point["generalisation"]["advbench"]) == {"rate", "ci95", "n", "quality"}
        assert point["generalisation"]["advbench"]["n"] == 5
    lines = generation_lines(tmp_path / "run")
    assert sum(line["set"] == "advbench" for line in lines) == 2 * 5
    jbb = {line["prompt"] for line in lines if line["set"] == "jbb_benign"}
    assert len(jbb) == 3


def test_kl_is_measured_in_the_configured_direction_and_recorded(tiny_folder, tmp_path):
    runs = {direction: run(small_job(tiny_folder, tmp_path / "cache", "method=caa", "eval.refusal.n=1",
                                     "eval.over_refusal.jbb_benign.n=0", "eval.over_refusal.xstest_safe.n=0",
                                     "eval.mmlu.n=0", "max_new_tokens=1", f"eval.kl.direction={direction}"),
                           tmp_path / direction.replace("||", "_"))
            for direction in ("steered||unsteered", "unsteered||steered")}
    for direction, results in runs.items():
        assert results["kl_direction"] == direction and results["points"][0]["kl_divergence"] == 0.0
    forward, reverse = (runs[d]["points"][1]["kl_divergence"] for d in ("steered||unsteered", "unsteered||steered"))
    assert forward > 0 and reverse > 0 and forward != pytest.approx(reverse, rel=1e-3)
