"""Bad input a new user tries (issue 13's table): each stops in about a second with one line, or is repaired.

Model-shape checks read only the model's config.json: the folders here hold no weights, so a check that
needed the model would fail with another message.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_config import composed
from test_pipeline import run, small_job

from cna.cache import StatisticsCache
from cna.circuit import Circuit
from cna.discovery import ActivationStatistics
from cna.errors import CnaError, ConfigError
from cna.models import ModelSpec, resolve_source
from cna.pipeline import prepare_data
from cna.run_folder import GENERATIONS, RESULTS
from cna.validation import validate
from conftest import data_dir

ROOT = Path(__file__).resolve().parents[1]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def config_only(tmp_path) -> Path:
    """A model folder with a 24-layer config.json (1536 neurons per layer) and no weights."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 24,
                                                    "intermediate_size": 1536}))
    return folder


@pytest.mark.parametrize(("overrides", "message"), [
    (["seed=abc"], "seed: expected an integer, got 'abc'"),
    (["seed=-1"], "seed: expected an integer >= 0, got -1"),
    (["method.layers=[30,40]"], "method.layers: [30, 40) is not within [0, 24)"),
    (["method=caa", "method.layer=99"], "method.layer: expected a layer in [0, 24) (model "),
    (["method=direction", "method.layer=24"], "method.layer: expected a layer in [0, 24)"),
    (["method.k=999999999"], "method.k: expected at most 36864 (the MLP neurons in 24 layers x 1536"),
    (["method.k=3073", "method.layers=[22,null]"], "method.k: expected at most 3072 (the MLP neurons in layers "
                                                   "[22, 24)"),
])
def test_model_shape_checks_read_config_json_and_name_their_key(overrides, message, config_only):
    with pytest.raises(ConfigError) as error:
        validate(composed(f"model.path={config_only}", *overrides))
    assert one_line(error).startswith(message)


def launch(tmp_path: Path, tiny_folder: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """launch.py as a user runs it (the tiny model, the real data files), and its wall time."""
    env = {**os.environ, "CNA_TINY_MODEL": str(tiny_folder), "CNA_DATA_DIR": str(data_dir()),
           "CNA_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "launch.py", "model=tiny_random", f"hydra.run.dir={tmp_path / 'run'}",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - started


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=caa", "method.scale=abc"], "method.scale: expected a number, got 'abc'"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode: expected one of auto, online, offline, disabled, got "
                                            "'bogus'"),
])
def test_a_wrong_value_stops_launch_with_one_line_before_the_model_loads(tmp_path, tiny_folder, overrides, message):
    done, _ = launch(tmp_path, tiny_folder, *overrides)
    assert done.returncode == 2 and done.stderr == f"error: {message}\n"
    assert not (tmp_path / "run" / "circuit.json").exists() and not (tmp_path / "cache").exists()


def test_discovery_rows_that_are_not_text_are_one_line_naming_the_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": 5}, {"instruction": None}]))
    cfg = composed(f"data_dir={data_dir()}", f"prompts.positive.path={path}")
    with pytest.raises(ConfigError) as error:
        prepare_data(cfg)
    assert one_line(error) == f"prompt file '{path}': row 1's 'instruction' is 5, not text"


def test_an_unreachable_judge_server_stops_the_job_before_the_model_loads(tmp_path, tiny_folder):
    done, seconds = launch(tmp_path, tiny_folder, "eval.judge=strongreject", "eval.judge.backend=openai",
                           "eval.judge.base_url=http://127.0.0.1:9/v1")  # the discard port: nothing answers
    assert done.returncode == 2 and seconds < 60
    assert done.stderr.startswith("error: eval.judge.base_url: nothing answers at http://127.0.0.1:9/v1")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "run" / "circuit.json").exists()


def test_settings_that_fit_the_model_pass(config_only):
    validate(composed(f"model.path={config_only}", "method.layers=[20,24]", "method.k=6144"))
    validate(composed(f"model.path={config_only}", "method=caa", "method.layer=23"))


@pytest.mark.parametrize(("suffix", "content", "message"), [
    (".json", b'["a prompt", "another"', "is not valid JSON (Expecting ',' delimiter at line 1"),
    (".jsonl", b'{"prompt": "fine"}\n{"prompt": broken}\n', "is not valid JSONL (Expecting value at line 2"),
    (".txt", "caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (".csv", b"goal\n\xff\xfe\n", "is not UTF-8 text (byte 0xff at offset 5)"),
])
def test_a_broken_discovery_file_is_one_line_naming_it(tmp_path, suffix, content, message):
    path = tmp_path / f"positive{suffix}"
    path.write_bytes(content)
    cfg = composed(f"data_dir={data_dir()}", f"prompts.positive.path={path}", "prompts.positive.column=prompt")
    with pytest.raises(ConfigError) as error:
        prepare_data(cfg)
    assert one_line(error).startswith(f"prompt file '{path}' {message}")


def test_a_broken_circuit_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "circuit.json").write_text('{"model": "m", "neurons": [')
    with pytest.raises(CnaError) as error:
        Circuit.load(tmp_path / "circuit.json")
    assert one_line(error).startswith(f"'{tmp_path / 'circuit.json'}' is not valid JSON (Expecting value")


def test_an_evaluation_csv_with_a_header_and_no_rows_says_so(tmp_path):
    (tmp_path / "empty.csv").write_text("Goal,Category\n")
    cfg = composed(f"data_dir={data_dir()}", f"eval.refusal.source.path={tmp_path / 'empty.csv'}",
                   "eval.refusal.source.hub=null", "eval.refusal.n=4")
    with pytest.raises(ConfigError) as error:
        prepare_data(cfg)
    assert one_line(error) == f"eval.refusal.source: '{tmp_path / 'empty.csv'}' has no rows (expected at least " \
                              "eval.refusal.n = 4)"


def test_a_truncated_statistics_file_is_recomputed_and_replaced(tmp_path, caplog):
    statistics = ActivationStatistics(n_prompts=2, neuron_sum=torch.ones(2, 3, dtype=torch.float64),
                                      residual_sum=torch.zeros(2, 4, dtype=torch.float64), position="last")
    cache = StatisticsCache(tmp_path)
    cache.get_or_compute("key", lambda: statistics)
    path = tmp_path / "key.safetensors"
    path.write_bytes(path.read_bytes()[:40])  # a disk that filled up mid-write, or a copy cut short
    with caplog.at_level(logging.WARNING):
        again = cache.get_or_compute("key", lambda: statistics)
    assert "key.safetensors is unreadable" in caplog.text and torch.equal(again.neuron_sum, statistics.neuron_sum)
    assert torch.equal(ActivationStatistics.load(path).neuron_sum, statistics.neuron_sum)  # replaced on disk
    assert (cache.hits, cache.misses) == (0, 2) and [p.name for p in tmp_path.iterdir()] == ["key.safetensors"]
    assert StatisticsCache(tmp_path).get_or_compute("key", lambda: pytest.fail("recomputed")).n_prompts == 2


def test_a_truncated_results_file_is_moved_aside_and_the_job_starts_afresh(tiny_folder, tmp_path, caplog):
    cfg = small_job(tiny_folder, tmp_path / "cache", "alphas=[0.0,1.0]", "eval.mmlu.n=0", "eval.kl.n=0",
                    "eval.over_refusal.jbb_benign.n=0", "eval.over_refusal.xstest_safe.n=0", "reuse_baseline=false")
    run_dir = tmp_path / "run"
    complete = run(cfg, run_dir)
    text = (run_dir / RESULTS).read_text()
    (run_dir / RESULTS).write_text(text[: len(text) // 2])
    with caplog.at_level(logging.WARNING):
        again = run(cfg, run_dir)
    assert "results.json is unreadable" in caplog.text and "starts afresh" in caplog.text
    assert again["status"] == "complete" and again["points"] == complete["points"]
    aside = list(run_dir.glob("results.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == text[: len(text) // 2]
    lines = [json.loads(line) for line in (run_dir / GENERATIONS).read_text().splitlines()]
    assert len(lines) == 2 * 4  # the old lines went with the old results: nothing twice


def test_the_model_cache_defaults_to_the_folder_the_readme_names(tmp_path, monkeypatch):
    monkeypatch.delenv("CNA_MODEL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".cache" / "cna-models" / "tiny-local"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_source(ModelSpec(name="org/tiny", local_name="tiny-local")) == str(folder)


def test_a_model_missing_with_no_network_fails_in_seconds_saying_how_to_fetch_it(tmp_path, monkeypatch):
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("CNA_MODEL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, as offline
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        validate(composed("model=llama3_1b"))
    assert time.perf_counter() - started < 10
    message = one_line(error)
    assert message.startswith(f"model: 'meta-llama/Llama-3.2-1B-Instruct' is not in the model cache "
                              f"({tmp_path / 'llama-3.2-1b-instruct'}")
    assert "http://127.0.0.1:9 cannot be reached" in message
    assert "huggingface-cli download meta-llama/Llama-3.2-1B-Instruct" in message and "model.path" in message


def test_a_job_killed_after_two_of_five_points_resumes_with_nothing_lost_or_duplicated(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch.py", "model=tiny_random", "logger=none", "reuse_baseline=false",
               "alphas=[0.0,0.25,0.5,0.75,1.0]", "eval.refusal.n=48", "eval.over_refusal.jbb_benign.n=0",
               "eval.over_refusal.xstest_safe.n=0", "eval.mmlu.n=0", "eval.kl.n=4", "prompts.n_positive=4",
               "prompts.n_negative=4", "max_new_tokens=24", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "CNA_TINY_MODEL": str(tiny_folder), "CNA_DATA_DIR": str(data_dir()),
           "CNA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            try:
                done = json.loads((run_dir / RESULTS).read_text())["points"]
            except (OSError, ValueError):
                done = []
            if len(done) >= 2:
                break
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait()
    killed = json.loads((run_dir / RESULTS).read_text())
    assert killed["status"] == "running" and 2 <= len(killed["points"]) < 5, "the job was not killed midway"
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    resumed = json.loads((run_dir / RESULTS).read_text())
    assert resumed["status"] == "complete"
    assert [p["alpha"] for p in resumed["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert resumed["points"][: len(killed["points"])] == killed["points"]
    lines = [json.loads(line) for line in (run_dir / GENERATIONS).read_text().splitlines()]
    assert sorted((line["alpha"], line["prompt"]) for line in lines) == sorted(
        {(line["alpha"], line["prompt"]) for line in lines}) and len(lines) == 5 * 48
