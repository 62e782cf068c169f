"""The engine seam: `engine=hf` is the default and changes nothing; `engine=vllm` composes, and where vLLM is not
installed says so in one line before any model loads (its own tests run in .venv-vllm: tests/vllm)."""

from __future__ import annotations

import importlib.util

import pytest
from test_pipeline import small_job

from cna.engines import engine_types
from cna.engines.hf import HfEngine, HfEngineConfig
from cna.engines.vllm import VllmEngineConfig
from cna.errors import ConfigError
from cna.validation import validate


def test_engines_are_plug_ins_and_hf_is_the_default(tiny_folder, tmp_path):
    assert {"hf", "vllm"} <= set(engine_types())
    assert isinstance(small_job(tiny_folder, tmp_path).engine, HfEngineConfig)
    job = small_job(tiny_folder, tmp_path, "engine=vllm", "engine.prefix_caching=true")
    assert isinstance(job.engine, VllmEngineConfig) and job.engine.prefix_caching and job.engine.enforce_eager


def test_bad_engine_settings_are_one_line(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"^engine.max_num_seqs: expected an integer >= 1, got 0$"):
        validate(small_job(tiny_folder, tmp_path, "engine=vllm", "engine.max_num_seqs=0"))
    with pytest.raises(ConfigError, match="engine.sampling"):
        small_job(tiny_folder, tmp_path, "engine=vllm", "+engine.sampling=1")


def test_engine_vllm_needs_vllm_and_says_so_before_loading(tiny_folder, tmp_path):
    job = small_job(tiny_folder, tmp_path, "engine=vllm")
    if importlib.util.find_spec("vllm") is not None:  # .venv-vllm: the check passes on to the model's
        validate(job)
        return
    with pytest.raises(ConfigError, match=r"^engine=vllm: vLLM is not installed: pip install 'cna\[vllm\]'"):
        validate(job)


def test_the_transformers_engine_keeps_the_baseline_key(tiny_folder, tmp_path):
    from cna import pipeline
    from cna.models import load_model

    job = small_job(tiny_folder, tmp_path)
    lm = load_model(job.model.spec())
    metrics = pipeline.prepare_data(job).metrics
    assert pipeline.baseline_key(job, lm, metrics, HfEngine(lm.model, lm.tokenizer)) == \
        pipeline.baseline_key(job, lm, metrics)
