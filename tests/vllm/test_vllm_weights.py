"""Weight edits inside vLLM (plain CPU weights stand in for CUDA's): equal to the hooks, restored exactly, and vLLM's
prefix cache never serves KV computed under another steering."""

from __future__ import annotations

import pytest
import torch
from vllm_cases import PROMPTS, interventions, start

from cna.data import encode_prompts

pytestmark = pytest.mark.integration
TOKENS = 24


@pytest.fixture(scope="module")
def engine_and_prompts(smollm2_folder):
    # block_size 32 (the CPU backend's attention takes multiples of 32): the chat-templated prompts (36-42 tokens)
    # fill a whole block, which the prefix cache keeps
    lm, engine = start(smollm2_folder, plain_cpu_weights=True, prefix_caching=True, block_size=32)
    assert engine.adapter.editable
    yield lm, engine, encode_prompts(lm.tokenizer, PROMPTS, "chat")
    engine.close()


def generate(engine, prompts):
    return engine.generate(prompts, max_new_tokens=TOKENS, batch_size=8, progress=False, desc="test")


def steered(engine, prompts, intervention, alpha, multiplier=None, weights=True):
    """(tokens, next-token log-probabilities) at one point, by weight edits or (weights=False) by hooks."""
    engine.config.weight_edits = weights
    try:
        assert (engine.weight_edit(intervention, alpha, multiplier) is not None) == weights
        with engine.steering(intervention, alpha, multiplier):
            return generate(engine, prompts), engine.next_token_logprobs(
                prompts, batch_size=8, max_batch_tokens=None, progress=False, desc="test")
    finally:
        engine.config.weight_edits = True


@pytest.mark.parametrize("multiplier", [0.0, 0.5])
def test_neuron_scaling_by_weights_is_the_hooks_bit_for_bit(engine_and_prompts, multiplier):
    lm, engine, prompts = engine_and_prompts
    intervention = engine.intervention(interventions(lm.adapter)["cna scale all"])
    by_weights = steered(engine, prompts, intervention, 1.0 - multiplier, multiplier)
    by_hooks = steered(engine, prompts, intervention, 1.0 - multiplier, multiplier, weights=False)
    assert by_weights[0] == by_hooks[0] and torch.equal(by_weights[1], by_hooks[1])  # m x w == (m x) w exactly


def test_directional_ablation_by_weights_matches_the_hooks(engine_and_prompts):
    lm, engine, prompts = engine_and_prompts
    intervention = engine.intervention(interventions(lm.adapter)["direction all"])
    by_weights = steered(engine, prompts, intervention, 1.0)
    by_hooks = steered(engine, prompts, intervention, 1.0, weights=False)
    assert by_weights[0] == by_hooks[0] and torch.allclose(by_weights[1], by_hooks[1], atol=1e-4)
    assert by_weights[0] != generate(engine, prompts)


def test_weights_come_back_bit_for_bit(engine_and_prompts):
    lm, engine, prompts = engine_and_prompts
    before = {name: weight.detach().clone() for name, weight in engine.model.named_parameters()}
    head = engine.model.lm_head.weight
    for name in ("cna scale all", "direction all"):
        with pytest.raises(RuntimeError), engine.steering(engine.intervention(interventions(lm.adapter)[name]), 1.0,
                                                          None):
            raise RuntimeError("mid-point")
    assert all(torch.equal(weight, before[name]) for name, weight in engine.model.named_parameters())
    assert engine.model.lm_head.weight is head  # the tied unembedding is the embedding again


def test_a_steered_point_never_reuses_unsteered_kv(engine_and_prompts, monkeypatch):
    lm, engine, prompts = engine_and_prompts
    intervention = engine.intervention(interventions(lm.adapter)["caa all"])

    def steered_after_plain() -> list:
        generate(engine, prompts)  # unsteered: fills the prefix cache with these prompts' KV
        with engine.steering(intervention, 1.0, None):
            return generate(engine, prompts)

    assert engine.llm.reset_prefix_cache()
    with engine.steering(intervention, 1.0, None):
        fresh = generate(engine, prompts)  # computed from an empty cache
    assert steered_after_plain() == fresh
    # The check can fail: with the cache left as it is, the steered point reads the unsteered prompts' KV.
    monkeypatch.setattr(engine, "_forget_prefixes", lambda: None)
    assert steered_after_plain() != fresh
