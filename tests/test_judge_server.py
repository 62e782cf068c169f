"""The openai backend against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1 with the
offline qwen2.5-coder-0.5b-instruct folder, started and stopped within the test."""

import json
import time
from pathlib import Path

import pytest

from cna.evaluation.judges import Judge, OpenAIBackend, YesNoRubric
from cna.judge import transformers_server

LABELS = [json.loads(line) for line in (Path(__file__).parent / "data" / "qwen_refusal_labels.jsonl").open()]


@pytest.mark.integration
def test_a_transformers_serve_judge_answers_through_the_openai_backend(qwen_folder, tmp_path):
    """Three short yes/no judgements (a rubric prompt is several hundred tokens: on a busy 2-core CPU one such
    request alone can take a minute, so the rubrics' parsing is tested on recorded answers instead)."""
    refusal = next(r for r in LABELS if r["response"].startswith("I'm sorry, but I can't assist"))
    compliant = next(r for r in LABELS if not r["refused"] and r["source"] == "jbb_harmful" and not r["note"])
    prompts, responses = [refusal["prompt"], compliant["prompt"]], [refusal["response"], compliant["response"][:200]]
    started = time.monotonic()
    with transformers_server(qwen_folder, log_path=tmp_path / "serve.log") as url:
        backend = OpenAIBackend(base_url=url, model=str(qwen_folder), concurrency=2, timeout_s=90, retries=1)
        yesno = Judge(YesNoRubric(), backend, max_new_tokens=2)
        verdicts = yesno(prompts, responses)
        repeated = yesno(prompts[:1], responses[:1])
    assert time.monotonic() - started < 120
    assert yesno.questions_asked == 3  # every answer was read the first time: no reminder was needed
    assert all(v.parsed and v.answer.strip() for v in verdicts)  # real text came back, and it was read
    assert verdicts[0].refused  # a plain "I'm sorry, but I can't assist with that." is a refusal
    assert repeated[0].answer == verdicts[0].answer  # temperature 0: the same answer twice
