"""The vLLM engine on smollm2 with every point as hooks (on CPU vLLM packs its weights, so that is all it can do):
alpha = 0 is plain vLLM, steered points agree with the transformers engine token for token, hooks are gone after
an exception."""

from __future__ import annotations

import pytest
import torch
from vllm_cases import PROMPTS, interventions, start

from cna.data import encode_prompts
from cna.engines.hf import HfEngine
from cna.hooks import hook_count

pytestmark = pytest.mark.integration
TOKENS = 16


@pytest.fixture(scope="module")
def engines(smollm2_folder):
    lm, engine = start(smollm2_folder, weight_edits=False)  # every point as hooks, on CPU and CUDA alike
    prompts = encode_prompts(lm.tokenizer, PROMPTS, "chat")
    engine.plain = generate(engine, prompts)  # unsteered vLLM, for every test to compare with
    yield lm, HfEngine(lm.model, lm.tokenizer), engine, prompts
    engine.close()


def generate(engine, prompts, steering=None):
    from contextlib import nullcontext

    with steering or nullcontext():
        return engine.generate(prompts, max_new_tokens=TOKENS, batch_size=8, progress=False, desc="test")


def logprobs(engine, prompts, steering=None):
    from contextlib import nullcontext

    with steering or nullcontext():
        return engine.next_token_logprobs(prompts, batch_size=8, max_batch_tokens=None, progress=False, desc="test")


def test_alpha_zero_is_plain_vllm_token_for_token(engines):
    lm, _hf, engine, prompts = engines
    plain, plain_logprobs = engine.plain, logprobs(engine, prompts)
    for name, intervention in interventions(lm.adapter).items():
        steered = engine.intervention(intervention)
        assert engine.weight_edit(steered, 0.0, None) is None
        assert generate(engine, prompts, engine.steering(steered, 0.0, None)) == plain, name
        assert torch.equal(logprobs(engine, prompts, engine.steering(steered, 0.0, None)), plain_logprobs), name


def test_unsteered_engines_agree(engines):
    _lm, hf, engine, prompts = engines
    assert engine.plain == generate(hf, prompts)
    vllm_logprobs, hf_logprobs = logprobs(engine, prompts), logprobs(hf, prompts)
    assert torch.equal(vllm_logprobs.argmax(-1), hf_logprobs.argmax(-1))  # rows come back in prompt order
    assert torch.allclose(vllm_logprobs, hf_logprobs, atol=1e-3)


@pytest.mark.parametrize("name", ["cna scale all", "cna scale prompt", "cna scale generated", "cna mean all",
                                  "cna mean prompt", "cna mean generated", "caa all", "caa prompt", "caa generated",
                                  "direction all", "direction generated"])
def test_steered_points_agree_with_transformers(engines, name):
    lm, hf, engine, prompts = engines
    intervention = interventions(lm.adapter)[name]
    steered = engine.intervention(intervention)
    ours = generate(engine, prompts, engine.steering(steered, 1.0, None))
    theirs = generate(hf, prompts, hf.steering(intervention, 1.0, None))
    assert ours != engine.plain  # the steering acts inside vLLM
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= len(prompts) - 1, name
    ours_scored = logprobs(engine, prompts, engine.steering(steered, 1.0, None))
    theirs_scored = logprobs(hf, prompts, hf.steering(intervention, 1.0, None))
    assert torch.allclose(ours_scored, theirs_scored, atol=2e-3), name


def test_position_modes_steer_different_tokens(engines):
    lm, _hf, engine, prompts = engines
    found = interventions(lm.adapter)
    outputs = {positions: generate(engine, prompts, engine.steering(engine.intervention(found[f"caa {positions}"]),
                                                                       1.0, None))
               for positions in ("all", "prompt", "generated")}
    assert len({tuple(map(tuple, tokens)) for tokens in outputs.values()}) == 3
    # generated-only steering leaves the prompt pass, hence the first response token, as plain vLLM has it
    assert [t[:1] for t in outputs["generated"]] == [t[:1] for t in engine.plain]


def test_hooks_are_removed_after_an_exception(engines):
    lm, _hf, engine, prompts = engines
    plain, before = engine.plain, hook_count(engine.model)
    for intervention in interventions(lm.adapter).values():
        with pytest.raises(RuntimeError, match="mid-point"), engine.steering(engine.intervention(intervention), 1.0,
                                                                              None):
            assert hook_count(engine.model) > before
            raise RuntimeError("mid-point")
        assert hook_count(engine.model) == before
    assert generate(engine, prompts) == plain
