"""Refilled generation (finished rows leave, waiting prompts join) gives plain greedy decoding's tokens."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import pytest
import torch

from cna.circuit import Circuit, Neuron
from cna.generation import generate, refillable
from cna.hooks import hook_count
from cna.interventions import NeuronScale
from cna.models import ArchitectureAdapter
from tests.conftest import random_prompts, tiny_model


def varied_stops(model, prompts, n: int) -> list[int]:
    """Up to n tokens that, as EOS, end greedy rows at the most different steps (tiny models repeat a lot)."""
    free = generate(model, prompts, pad_token_id=0, eos_token_id=[], max_new_tokens=12, progress=False)
    candidates = [token for token, _ in Counter(t for row in free for t in row).most_common(20)]

    def lengths(stops) -> int:
        return len({next((i for i, t in enumerate(row) if t in stops), len(row)) for row in free})

    return list(max((c for k in range(1, n + 1) for c in combinations(candidates, k)), key=lengths))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gpt_neox", "opt"])
def test_refilled_tokens_equal_plain_greedy_decoding(model_type):
    model = tiny_model(model_type)
    assert refillable(model)
    prompts = random_prompts(23, seed=7, low=2, high=30)
    stops = varied_stops(model, prompts, 3)
    settings = dict(pad_token_id=0, eos_token_id=stops, max_new_tokens=12, progress=False)
    plain = generate(model, prompts, batch_size=8, **settings)
    lengths = {len(row) for row in plain}
    assert len(lengths) >= 4 and 12 in lengths  # rows end at many steps, some never
    for batch_size in (1, 3, 8, 64):
        assert generate(model, prompts, batch_size=batch_size, refill=True, **settings) == plain, batch_size


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_refill_under_steering_hooks_and_position_modes(positions):
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    neurons = [Neuron(layer, j, 1.0, 1.0, 0.0) for layer in (0, 1) for j in range(0, 64, 2)]
    circuit = Circuit("tiny", "cna", neurons, 2, 64)
    prompts = random_prompts(11, seed=8, low=2, high=20)
    stops = varied_stops(model, prompts, 2)
    settings = dict(pad_token_id=0, eos_token_id=stops, max_new_tokens=10, batch_size=4, progress=False)
    with NeuronScale(adapter, circuit, positions=positions).multiply(8.0):
        plain = generate(model, prompts, **settings)
        refilled = generate(model, prompts, refill=True, **settings)
    assert refilled == plain
    assert plain != generate(model, prompts, **settings)  # the steering changed something
    assert hook_count(model) == 0


def test_processors_in_the_generation_config_keep_plain_generate():
    model = tiny_model("llama")
    model.generation_config.repetition_penalty = 1.3
    assert not refillable(model)
    assert not refillable(tiny_model("mistral", sliding_window=8, use_sliding_window=True))


def test_a_job_with_refill_and_baking_measures_what_a_plain_one_does(tiny_folder, tmp_path):
    from test_pipeline import run, small_job

    settings = ["method.k=6", "reuse_baseline=false", "alphas=[0.0,1.0]", "eval.mmlu.n=0", "eval.kl.n=0",
                "max_new_tokens=8", "batch_size=3"]
    plain = run(small_job(tiny_folder, tmp_path / "cache", *settings, "refill_generation=false"), tmp_path / "a")
    faster = run(small_job(tiny_folder, tmp_path / "cache", *settings, "bake_steering=true"), tmp_path / "b")
    assert faster["points"] == plain["points"]
    lines = [(tmp_path / d / "generations.jsonl").read_text() for d in "ab"]
    assert lines[0] == lines[1]


def bakeable(intervention: NeuronScale) -> bool:
    return intervention.baked(0.5) is not None


def test_only_cna_scaling_at_every_position_is_baked():
    adapter = ArchitectureAdapter(tiny_model("llama"))
    circuit = Circuit("tiny", "cna", [Neuron(1, 3, 1.0, 1.0, 0.5)], 2, 64)
    assert bakeable(NeuronScale(adapter, circuit))
    assert not bakeable(NeuronScale(adapter, circuit, mode="mean"))
    assert not bakeable(NeuronScale(adapter, circuit, positions="generated"))
    site = adapter.neuron_sites[0]  # offloaded (weights on meta): outside the circuit it does not matter
    site.weight = torch.nn.Parameter(torch.empty_like(site.weight, device="meta"))
    assert bakeable(NeuronScale(adapter, circuit))
    assert not bakeable(NeuronScale(adapter, Circuit("tiny", "cna", [Neuron(0, 3, 1.0, 1.0, 0.5)], 2, 64)))
