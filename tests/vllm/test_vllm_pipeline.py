"""A launch.py job on the vLLM engine: one engine for every point of the job, and what the engine cannot run said in
one line before any model loads."""

from __future__ import annotations

import json

import pytest

from cna import pipeline
from cna.config import compose_job
from cna.engines.vllm import VllmEngine
from cna.errors import ConfigError
from cna.run_folder import GENERATIONS, RESULTS
from cna.validation import validate
from conftest import data_dir

pytestmark = pytest.mark.integration


def job(folder, cache, *overrides):
    circuit_size = [] if any(o.startswith("method=") for o in overrides) else ["method.k=40"]  # cna's key only
    return compose_job([
        "model=smollm2_135m", f"model.path={folder}", "model.dtype=float32", "model.device=cpu",
        f"data_dir={data_dir()}", f"cache_dir={cache}", "logger=none", "engine=vllm", "engine.kv_cache_gib=1",
        "engine.max_model_len=2048", "eval.refusal.n=6", "eval.over_refusal.jbb_benign.n=3",
        "eval.over_refusal.xstest_safe.n=0", "eval.mmlu.n=6", "eval.kl.n=4", "prompts.n_positive=8",
        "prompts.n_negative=8", "max_new_tokens=8", "alphas=[0.0,0.5,1.0]", *circuit_size, *overrides])


def test_a_job_steers_every_point_with_one_engine(smollm2_folder, tmp_path):
    loads = VllmEngine.loads
    results = pipeline.run(job(smollm2_folder, tmp_path / "cache", "method.positions=prompt"), tmp_path / "run")
    assert VllmEngine.loads == loads + 1  # loaded once, reused by the three points (and closed after)
    saved = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert saved == results.to_dict() and saved["status"] == "complete"
    assert [p["alpha"] for p in saved["points"]] == [0.0, 0.5, 1.0]
    assert saved["points"][0]["kl_divergence"] == 0.0 and saved["points"][2]["kl_divergence"] > 0
    assert all(p["mmlu_accuracy"] is not None for p in saved["points"])
    assert "load_engine" in saved["timings_s"]
    lines = [json.loads(line) for line in (tmp_path / "run" / GENERATIONS).read_text().splitlines()]
    by_alpha = {alpha: [line["response"] for line in lines if line["alpha"] == alpha] for alpha in (0.0, 1.0)}
    assert len(by_alpha[0.0]) == 9 and by_alpha[0.0] != by_alpha[1.0]


@pytest.mark.parametrize(("overrides", "key"), [
    (["engine.enforce_eager=false"], "engine.enforce_eager"),  # packed CPU weights: every point needs hooks
    (["engine.enforce_eager=false", "engine.plain_cpu_weights=true", "method.mode=mean"], "engine.enforce_eager"),
    (["engine.enforce_eager=false", "engine.plain_cpu_weights=true", "method=caa"], "engine.enforce_eager"),
    (["model.quantization=4bit"], "model.quantization"),
    (["model.device_map=auto"], "model.device_map"),
])
def test_what_the_engine_cannot_run_is_one_line_before_loading(smollm2_folder, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: ") as error:
        validate(job(smollm2_folder, tmp_path, *overrides))
    assert "\n" not in str(error.value)


def test_weight_edits_with_cuda_graphs_pass_the_check(smollm2_folder, tmp_path):
    for method in (["method.mode=scale"], ["method=direction"]):
        validate(job(smollm2_folder, tmp_path, "engine.enforce_eager=false", "engine.plain_cpu_weights=true", *method))
