"""Thinking models and chat templates: template arguments and a system prompt reach the prompt tokens and the cache
keys; reasoning blocks stay in the record but never reach a classifier; the reasoning budget closes a block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_pipeline import run, small_job

from cna.data import encode_prompts
from cna.errors import ConfigError
from cna.evaluation.evaluator import PointContext, Session
from cna.generation import generate
from cna.methods.base import Statistics
from cna.models import ModelSpec, load_model
from cna.reasoning import FORMATS, ReasoningSplitter, reasoning_format
from cna.run_folder import GENERATIONS
from cna.tiny import THINK_TOKENS, VOCAB, tiny_tokenizer, write_tiny_model

OPEN, CLOSE = VOCAB, VOCAB + 1  # <think>, </think> in the thinking variant's vocabulary


@pytest.fixture(scope="module")
def thinking_folder(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-thinking", thinking=True)


def test_template_arguments_and_a_system_prompt_reach_the_prompt_tokens():
    tokenizer = tiny_tokenizer(thinking=True)
    assert tokenizer.convert_tokens_to_ids(THINK_TOKENS) == [OPEN, CLOSE]
    assert encode_prompts(tokenizer, ["w10 w11"]) == [[1, 10, 11, 4, OPEN]]  # the template opens a block
    assert encode_prompts(tokenizer, ["w10 w11"], template_kwargs={"enable_thinking": False}) == [
        [1, 10, 11, 4, OPEN, CLOSE]]  # enable_thinking=false: an empty, closed block
    assert encode_prompts(tokenizer, ["w10"], system_prompt="w20 w21") == [[1, 20, 21, 10, 4, OPEN]]
    with pytest.raises(ConfigError, match="need model.template=chat"):
        encode_prompts(tokenizer, ["w10"], "raw", system_prompt="w20")


def test_a_template_that_rejects_a_system_turn_is_one_line_naming_the_key():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    with pytest.raises(ConfigError, match=r"^model.system_prompt: the model's chat template rejects it \(System"):
        encode_prompts(tokenizer, ["w10"], system_prompt="w20")


def test_the_reasoning_format_is_found_from_the_tokenizer_or_named():
    assert reasoning_format(tiny_tokenizer(thinking=True)) == FORMATS["think"]
    assert reasoning_format(tiny_tokenizer()) is None  # no markers: a plain model
    assert reasoning_format(tiny_tokenizer(thinking=True), "none") is None
    assert reasoning_format(tiny_tokenizer(), "harmony") == FORMATS["harmony"]
    with pytest.raises(ConfigError, match="model.reasoning: expected one of auto, none, think, harmony"):
        reasoning_format(tiny_tokenizer(), "deepseek")


def test_the_splitter_finds_the_answer_after_think_and_after_gpt_oss_channels():
    think = ReasoningSplitter(tiny_tokenizer(thinking=True), FORMATS["think"])
    assert think.split([OPEN, 5, 6, CLOSE, 7, 8], prompt_open=False) == (4, False)
    assert think.split([5, 6, CLOSE, 7], prompt_open=True) == (3, False)  # R1: the prompt opened the block
    assert think.split([5, 6, 7], prompt_open=True) == (3, True)  # still reasoning: no answer yet
    assert think.split([5, 6, 7], prompt_open=False) == (None, False)  # no block at all: all of it is the answer
    assert think.opened_in([1, 10, 4, OPEN]) and not think.opened_in([1, 10, 4, OPEN, CLOSE])
    assert think.closed_in([1, 10, 4, OPEN, CLOSE]) and not think.closed_in([1, 10, 4])

    harmony_tokenizer = tiny_tokenizer()  # gpt-oss's markers as special tokens, its channel names as words
    harmony_tokenizer.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>", "<|end|>",
                                                                        "<|start|>"]})
    harmony_tokenizer.add_tokens(["analysis", "final", "assistant"])
    harmony = ReasoningSplitter(harmony_tokenizer, FORMATS["harmony"])
    ids = harmony_tokenizer("<|channel|>analysis<|message|>w5 w6<|end|><|start|>assistant<|channel|>final"
                            "<|message|>w7 w8", add_special_tokens=False)["input_ids"]
    start, still_open = harmony.split(ids, prompt_open=False)
    generation = harmony.generation(ids, start, False)
    assert not still_open and generation.answer == "w7 w8" and "w5 w6" in generation.reasoning
    assert generation.response.startswith("<|channel|> analysis")  # the record keeps the channels


def _session(lm, **settings) -> tuple[Session, list[str]]:
    read: list[str] = []

    def recording_classifier(text: str) -> bool:  # every text a classifier is shown
        read.append(text)
        return False

    return Session(lm.model, lm.tokenizer, batch_size=3, progress=False, is_refusal=recording_classifier,
                   reasoning=reasoning_format(lm.tokenizer), **settings), read


def test_reasoning_stays_in_the_record_and_the_classifier_reads_only_the_answer(thinking_folder):
    lm = load_model(ModelSpec(name="tiny-thinking", path=str(thinking_folder)))
    session, read = _session(lm, reasoning_tokens=5, max_new_tokens=4)
    prompts = ["w10 w11", "w12", "w13 w14 w15", "w16 w17", "w18"]
    evaluated = PointContext(session, 0.0, None).responses("harmful", prompts)
    records = evaluated.records
    assert read == [r["answer"] for r in records]  # the classifier saw the answers and nothing else
    for record in records:
        assert record["reasoning"] is not None and "</think>" in record["response"]
        assert record["response"].endswith(record["answer"]) and "</think>" not in record["answer"]
        assert record["reasoning_tokens"] <= 5 + 1  # the budget, then the closing marker
        assert len(lm.tokenizer(record["answer"], add_special_tokens=False)["input_ids"]) <= 4
    # The random model never closes its block within 5 tokens here: each was closed for it, and its answer is
    # exactly what greedy decoding writes after the first 5 reasoning tokens and the marker.
    assert all(r["closed_by_budget"] for r in records)
    encoded = session.encode(prompts)
    settings = dict(pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=[2], progress=False)
    reasoning = generate(lm.model, encoded, max_new_tokens=5, **settings)
    answers = generate(lm.model, [p + r + [CLOSE] for p, r in zip(encoded, reasoning, strict=True)],
                       max_new_tokens=4, **settings)
    assert [r["answer"] for r in records] == [lm.tokenizer.decode(a, skip_special_tokens=True) for a in answers]


def test_enable_thinking_false_answers_at_once_within_the_answer_budget(thinking_folder):
    lm = load_model(ModelSpec(name="tiny-thinking", path=str(thinking_folder)))
    session, read = _session(lm, reasoning_tokens=50, max_new_tokens=4, template_kwargs={"enable_thinking": False})
    records = PointContext(session, 0.0, None).responses("harmful", ["w10 w11", "w12"]).records
    assert all(r["reasoning"] is None and r["answer"] == r["response"] for r in records)
    plain = generate(lm.model, session.encode(["w10 w11", "w12"]), pad_token_id=0, eos_token_id=[2], max_new_tokens=4,
                     progress=False)
    assert read == [lm.tokenizer.decode(t, skip_special_tokens=True) for t in plain]


@pytest.mark.parametrize("answer_budget", [3, 8], ids=["cut", "continued"])
def test_a_block_the_model_closes_itself_keeps_the_answer_greedy_decoding_writes(thinking_folder, answer_budget):
    """The lm head's </think> row leans towards the <think> token's embedding, so the model closes its block at
    once; its answer is then what plain greedy decoding writes after the marker, cut to the answer budget (3, within
    the first pass) or continued in a second pass (8, beyond the 6-token reasoning pass)."""
    lm = load_model(ModelSpec(name="tiny-thinking", path=str(thinking_folder)))
    embedding = lm.model.model.embed_tokens.weight
    with torch.no_grad():
        lm.model.lm_head.weight[CLOSE] += 5 * embedding[OPEN] / embedding[OPEN].norm()
    session, read = _session(lm, reasoning_tokens=6, max_new_tokens=answer_budget)
    record, = PointContext(session, 0.0, None).responses("harmful", ["w10 w11"]).records
    plain, = generate(lm.model, session.encode(["w10 w11"]), pad_token_id=0, eos_token_id=[2],
                      max_new_tokens=1 + answer_budget, progress=False)
    assert plain[0] == CLOSE and CLOSE not in plain[1:]  # the planted behaviour: closed at once, never again
    assert not record["closed_by_budget"] and record["reasoning_tokens"] == 1
    assert read == [record["answer"]] == [lm.tokenizer.decode(plain[1:], skip_special_tokens=True)]


def test_a_thinking_model_job_keeps_reasoning_in_generations_and_keys_its_caches(thinking_folder, tmp_path):
    cache = tmp_path / "cache"
    base = ["method.k=6", "model.reasoning_tokens=3", "max_new_tokens=2", "eval.mmlu.n=0", "alphas=[0.0]"]
    first = run(small_job(thinking_folder, cache, *base), tmp_path / "a")
    lines = [json.loads(line) for line in (tmp_path / "a" / GENERATIONS).read_text().splitlines()]
    assert all({"answer", "reasoning", "reasoning_tokens", "closed_by_budget"} <= set(line) for line in lines)
    assert first["points"][0]["refusal_rate"] is not None
    # A system prompt changes the prompt tokens: statistics and the unsteered point are computed afresh.
    second = run(small_job(thinking_folder, cache, *base, "model.system_prompt=w30"), tmp_path / "b")
    assert second["cache"]["misses"] == first["cache"]["misses"] and second["cache"]["hits"] == 0
    assert "reused" not in second["points"][0]
    again = run(small_job(thinking_folder, cache, *base, "model.system_prompt=w30"), tmp_path / "c")
    assert again["cache"]["misses"] == 0 and again["points"][0]["reused"]


def test_the_statistics_key_names_the_prompt_format_and_keeps_old_keys_without_one(tiny_folder):
    lm = load_model(ModelSpec(name="tiny", path=str(tiny_folder)))
    plain = Statistics(lm.model, lm.tokenizer)
    system = Statistics(lm.model, lm.tokenizer, system_prompt="w30")
    assert plain.prompt_format() is None
    assert system.prompt_format() == {"system_prompt": "w30", "chat_template_kwargs": {}}
