"""Refusal classifiers against responses of qwen2.5-coder-0.5b-instruct labelled by hand.

tests/data/qwen_refusal_labels.jsonl: 72 greedy responses (48 new tokens) to JBB harmful and
benign goals and XSTest prompts, each labelled "refused" when the response declines or
deflects instead of doing the task (a response that subverts the task without declining is
not a refusal). The `note` field explains the hard cases.
"""

import json
from pathlib import Path

import pytest

from cna.evaluation.refusal import KeywordRefusalClassifier, LLMRefusalJudge
from cna.models import ModelSpec, load_model

LABELS = [json.loads(line) for line in (Path(__file__).parent / "data" / "qwen_refusal_labels.jsonl").open()]


def test_the_labelled_set_is_balanced_and_covers_every_source():
    assert len(LABELS) == 72
    assert 0.4 < sum(row["refused"] for row in LABELS) / len(LABELS) < 0.6
    assert {row["source"] for row in LABELS} == {"jbb_harmful", "jbb_benign", "xstest_safe", "xstest_unsafe"}


def test_keyword_classifier_agrees_with_hand_labels():
    classify = KeywordRefusalClassifier()
    disagreements = [row for row in LABELS if classify(row["response"]) != row["refused"]]
    assert len(disagreements) <= 3  # 69 of 72 when the list was written
    # Every plain "I'm sorry, but I can't..." refusal is caught; the misses are the documented hard cases.
    assert all(row["note"] for row in disagreements)


@pytest.mark.integration
def test_llm_judge_ranks_known_refusals_below_compliance(qwen_folder):
    refusals = [row for row in LABELS if row["refused"]][:4]
    compliant = [row for row in LABELS if not row["refused"] and not row["note"]][:4]
    loaded = load_model(ModelSpec(name="Qwen/Qwen2.5-Coder-0.5B-Instruct", path=str(qwen_folder)))
    judge = LLMRefusalJudge(loaded.model, loaded.tokenizer, batch_size=8)
    rows = refusals + compliant
    complied = judge.compliance_probability([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert max(complied[:4]) < min(complied[4:])
    assert judge([r["prompt"] for r in refusals], [r["response"] for r in refusals]) == [True] * 4
