"""The library without the framework: the public API runs with Hydra, OmegaConf and W&B unimportable, and the
quickstart notebook runs top to bottom on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import cna
from cna.hooks import hook_count
from conftest import data_dir, random_prompts

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"

# Run first in a fresh interpreter: these import as on a machine that lacks them (None in sys.modules makes
# `import` fail and importlib's find_spec say "not installed").
FRAMEWORK = ("hydra", "omegaconf", "wandb")
BLOCK_FRAMEWORK = f"import sys\nsys.modules.update(dict.fromkeys({FRAMEWORK!r}))\n"


def notebook_code() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


def test_the_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert len(code) >= 5 and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


def test_the_quickstart_runs_without_hydra_omegaconf_or_wandb(tiny_folder, tmp_path):
    env = {**os.environ, "CNA_QUICKSTART_MODEL": str(tiny_folder), "CNA_DATA_DIR": str(data_dir()),
           "CNA_QUICKSTART_N": "8", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = BLOCK_FRAMEWORK + notebook_code() + (
        f"\nassert all(sys.modules[name] is None for name in {FRAMEWORK!r})\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {FRAMEWORK!r} and '.' in m]\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "neurons; per layer:" in printed and "m = 4:" in printed
    table = printed.split("alpha")[1].splitlines()
    assert "refusal_rate" in table[0] and "kl_divergence" in table[0] and len(table) >= 4  # header + 3 points
    assert "the exported model generates what the hooks do: True" in printed


def test_discover_steer_evaluate_on_the_tiny_model(tiny_folder):
    model, tokenizer = cna.load_model(str(tiny_folder))
    positive = [" ".join(f"w{t}" for t in prompt) for prompt in random_prompts(6, seed=21)]
    negative = [" ".join(f"w{t}" for t in prompt) for prompt in random_prompts(6, seed=22)]
    circuit = cna.discover(model, tokenizer, positive, negative, k=5, progress=False)
    assert circuit.k == 5 and circuit.method == "cna" and circuit.model == str(tiny_folder)
    ids = tokenizer(positive[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = model(ids).logits
        with cna.steer(model, circuit, alpha=0.0):
            assert torch.equal(model(ids).logits, plain)  # alpha = 0 is bit-identical
        with cna.steer(model, circuit, multiplier=3.0):
            assert hook_count(model) > 0 and not torch.equal(model(ids).logits, plain)
    assert hook_count(model) == 0
    results = cna.evaluate(model, tokenizer, [cna.Refusal(positive[:3]), cna.Kl(negative[:3])], alphas=[0.0, 1.0],
                           intervention=circuit, max_new_tokens=3, progress=False)
    assert [p.alpha for p in results.points] == [0.0, 1.0] and results.points[0].kl_divergence == 0.0
    assert results.points[1].kl_divergence > 0 and results.points[0].n_prompts == 3
    assert len(results.generations) == 2 * 3 and {"refusal", "kl", "generation"} & set(results.timings_s)
    vector = cna.caa(model, tokenizer, positive, negative, layer=1, progress=False)
    with cna.steer(model, vector, alpha=0.0), torch.inference_mode():
        assert torch.equal(model(ids).logits, plain)
    assert vector.method == "caa" and cna.direction(model, tokenizer, positive, negative, progress=False).layers == [
        0, 1, 2]


def test_bad_settings_are_one_line_errors_before_any_work(tiny_folder):
    model, tokenizer = cna.load_model(str(tiny_folder))
    for settings, message in [({"sign": "up"}, "sign: expected one of abs, positive, negative, got 'up'"),
                              ({"k_fraction": 2.0}, "k_fraction: expected a number in (0, 1], got 2"),
                              ({"colour": "red"}, "discover: ")]:
        try:
            cna.discover(model, tokenizer, ["a"], ["b"], **settings)
        except cna.ConfigError as error:
            assert str(error).startswith(message) and "\n" not in str(error)
        else:
            raise AssertionError(f"{settings} was accepted")
