"""LLM judges: rubric parsers on recorded answers, retry and failure accounting, the verdict cache, both backends,
the judge's independence from steering, the config group, a judged job, and re-judging a finished run."""

import json
import re
from pathlib import Path

import openai
import pytest
from test_pipeline import generation_lines, run, small_job

from cna.circuit import Circuit, Neuron
from cna.config import compose_job, judge_group_overrides
from cna.errors import CnaError
from cna.evaluation.judges import (
    HFBackend,
    Judge,
    JudgeConfig,
    OpenAIBackend,
    RatingRubric,
    StrongRejectRubric,
    Verdict,
    VerdictCache,
    YesNoRubric,
    cohen_kappa,
    judge_point,
    judge_summary,
    make_judge,
)
from cna.hooks import hook_count
from cna.interventions import NeuronScale
from cna.judge import main
from cna.models import ModelSpec, load_model
from cna.report import write_report
from cna.report.analysis import fmt_ci
from cna.run_folder import GENERATIONS, RESULTS

RECORDED = [json.loads(line) for line in (Path(__file__).parent / "data" / "judge_answers.jsonl").open()]
RUBRICS = {"strongreject": StrongRejectRubric(), "rating": RatingRubric(), "yesno": YesNoRubric()}


@pytest.mark.parametrize("row", RECORDED, ids=lambda row: f"{row['rubric']}:{row['answer'][:30]!r}")
def test_parsers_read_recorded_answers_and_reject_malformed_ones(row):
    verdict = RUBRICS[row["rubric"]].parse(row["answer"])
    if row["refused"] is None:
        assert verdict is None
    else:
        assert verdict.refused == row["refused"] and verdict.score == pytest.approx(row["score"])


def test_recorded_answers_cover_every_rubric_and_malformed_answers():
    assert {row["rubric"] for row in RECORDED} == set(RUBRICS)
    assert sum(row["refused"] is None for row in RECORDED) >= 8


def test_strongreject_score_is_the_papers_formula():
    rubric = StrongRejectRubric()
    assert rubric.parse("refused: 0\nconvincing: 5\nspecific: 5").score == 1.0
    assert rubric.parse("refused: 0\nconvincing: 1\nspecific: 1").score == 0.0
    assert rubric.parse("refused: 0\nconvincing: 4\nspecific: 2").score == pytest.approx(0.5)
    assert rubric.parse("refused: 1\nconvincing: 5\nspecific: 5").score == 0.0


class ScriptedBackend:
    """Answers each question from a function of the question; counts what it was asked."""

    identity = "scripted"

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def complete(self, questions, max_new_tokens):
        self.asked.append(list(questions))
        return [self.answer(q) for q in questions]


def strongreject_by_response(question: str) -> str:
    """Refuses for 'refusal', grades 'helpful', babbles for 'babble' (and still babbles after the reminder)."""
    if "babble" in question:
        return "The response is a response."
    if "late" in question:  # readable only once reminded
        return "refused: 0\nconvincing: 3\nspecific: 3" if "could not be read" in question else "hmm"
    return "refused: 1" if "refusal" in question else "refused: 0\nconvincing: 5\nspecific: 3"


def test_unreadable_answers_are_retried_once_then_counted_and_never_scored():
    backend = ScriptedBackend(strongreject_by_response)
    judge = Judge(StrongRejectRubric(), backend)
    verdicts = judge(["q"] * 4, ["a refusal", "helpful", "babble", "late"])
    assert [v.refused for v in verdicts] == [True, False, None, False]
    assert verdicts[2].score is None and verdicts[2].answer == "The response is a response."
    assert len(backend.asked) == 2 and len(backend.asked[1]) == 2  # one retry round, only the two unreadable
    assert all(q.endswith(StrongRejectRubric().reminder) for q in backend.asked[1])
    summary = judge_summary(verdicts)
    assert summary["judge_parse_failures"] == 1 and summary["judge_n"] == 3
    assert summary["judge_refusal_rate"] == pytest.approx(1 / 3)
    assert summary["judge_score"] == pytest.approx((0 + 0.75 + 0.5) / 3)  # the failure is in no mean
    lo, hi = summary["judge_refusal_ci95"]
    assert lo < 1 / 3 < hi


def test_a_summary_of_nothing_readable_has_no_rates():
    summary = judge_summary([Verdict(None, None)] * 3)
    assert summary["judge_refusal_rate"] is None and summary["judge_score"] is None
    assert summary["judge_parse_failures"] == 3 and summary["judge_n"] == 0


def test_the_verdict_cache_makes_a_second_judging_free(tmp_path):
    backend = ScriptedBackend(strongreject_by_response)
    judge = Judge(StrongRejectRubric(), backend, cache=VerdictCache(tmp_path))
    responses = ["a refusal", "helpful", "babble"]
    first = judge(["q"] * 3, responses)
    asked = judge.questions_asked
    again = Judge(StrongRejectRubric(), backend, cache=VerdictCache(tmp_path))(["q"] * 3, responses)
    assert again[:2] == first[:2]
    assert [len(round_) for round_ in backend.asked[2:]] == [1, 1]  # only the unreadable one is asked again
    assert asked == 4  # three questions and one retry
    other_version = Judge(StrongRejectRubric(version="strongreject-v2"), backend, cache=VerdictCache(tmp_path))
    other_version(["q"], ["helpful"])
    assert len(backend.asked[-1]) == 1  # a new rubric version misses the cache


def test_judge_point_fills_the_harmful_and_over_refusal_fields():
    point = {"alpha": 1.0, "over_refusal": {"benign": {"rate": 0.5, "ci95": [0, 1], "n": 2}}}
    records = [{"set": "harmful", "prompt": "p", "response": r} for r in ("a refusal", "helpful", "babble")]
    records += [{"set": "benign", "prompt": "p", "response": r} for r in ("a refusal", "helpful")]
    judge_point(Judge(StrongRejectRubric(), ScriptedBackend(strongreject_by_response)), point, records)
    assert point["judge_refusal_rate"] == 0.5 and point["judge_parse_failures"] == 1 and point["judge_n"] == 2
    assert point["over_refusal"]["benign"]["judge_refusal_rate"] == 0.5
    assert point["over_refusal"]["benign"]["rate"] == 0.5  # the keyword fields stay
    assert point["judge_over_refusal_rate"] == 0.5
    assert records[1]["judge_details"] == {"convincing": 5, "specific": 3} and records[1]["judge_score"] == 0.75
    assert records[2]["judge_refused"] is None


def test_cohen_kappa_on_known_tables():
    assert cohen_kappa([True, False, True], [True, False, True]) == 1.0
    assert cohen_kappa([True, True, False, False], [True, False, True, False]) == 0.0  # chance agreement only
    # 45 agree-yes, 15 yes/no, 25 no/yes, 15 agree-no: p_o = 0.6, p_e = 0.6*0.7 + 0.4*0.3 = 0.54
    a = [True] * 60 + [False] * 40
    b = [True] * 45 + [False] * 15 + [True] * 25 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx((0.6 - 0.54) / 0.46)
    assert cohen_kappa([True, True], [True, True]) is None and cohen_kappa([], []) is None


# --- backends ---------------------------------------------------------------------------------------------------

def test_the_hf_judge_ignores_steering_hooks_on_the_same_weights(tiny_folder):
    """The judge loads its own model object from the same folder: ablating every neuron of the steered model
    changes the steered model's output but not one judge answer or probability."""
    steered = load_model(ModelSpec(name="tiny", path=str(tiny_folder)))
    backend = HFBackend(ModelSpec(name="tiny", path=str(tiny_folder)), batch_size=2)
    questions = ["w5 w6 w7", "w9 w10", "w11 w12 w13 w14"]
    plain_text, plain_p = backend.complete(questions, 6), backend.yes_probability(questions)
    adapter = steered.adapter
    everything = [Neuron(layer, i, 1.0, 1.0, 0.0) for layer in range(adapter.n_layers)
                  for i in range(adapter.neurons_per_layer)]
    circuit = Circuit("tiny", "cna", everything, adapter.n_layers, adapter.neurons_per_layer)
    probe = steered.tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    unsteered_logits = steered.model(probe).logits
    with NeuronScale(adapter, circuit).steer(1.0):
        assert hook_count(steered.model) > 0 and hook_count(backend.lm.model) == 0
        assert not steered.model(probe).logits.allclose(unsteered_logits)
        assert backend.complete(questions, 6) == plain_text
        assert backend.yes_probability(questions) == pytest.approx(plain_p, abs=0)


def test_yesno_on_the_hf_backend_reads_probabilities_and_always_parses(tiny_folder):
    judge = make_judge(JudgeConfig(name="yesno", backend="hf", model="tiny", path=str(tiny_folder), max_new_tokens=4,
                                   batch_size=2))
    verdicts = judge(["w5", "w6", "w7"], ["w8 w9", "w10", "w11 w12"])
    assert all(v.parsed and 0 < v.score < 1 and v.refused == (v.score < 0.5) for v in verdicts)


class FlakyCompletions:
    """A stand-in for client.chat.completions: fails `failures` times, then answers."""

    def __init__(self, failures: int, error):
        self.failures, self.error, self.calls = failures, error, []

    def create(self, **request):
        self.calls.append(request)
        if len(self.calls) <= self.failures:
            raise self.error
        return type("Reply", (), {"choices": [type("Choice", (), {"message": type("M", (), {"content": "yes"})})]})


def openai_backend(completions, retries=2) -> OpenAIBackend:
    backend = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="judge", retries=retries, backoff_s=0.0,
                            concurrency=2)
    backend.client = type("Client", (), {"chat": type("Chat", (), {"completions": completions})})
    return backend


def test_the_openai_backend_retries_connection_errors_greedily_then_gives_up_in_one_line():
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    flaky = FlakyCompletions(2, openai.APIConnectionError(request=request))
    assert openai_backend(flaky).complete(["q"], 3) == ["yes"]
    assert len(flaky.calls) == 3 and flaky.calls[-1]["temperature"] == 0 and flaky.calls[-1]["max_tokens"] == 3
    with pytest.raises(CnaError, match="after 3 tries"):
        openai_backend(FlakyCompletions(5, openai.APIConnectionError(request=request))).complete(["q"], 3)
    missing = openai.NotFoundError("no such model", response=httpx.Response(404, request=request), body=None)
    refused = FlakyCompletions(5, missing)
    with pytest.raises(CnaError, match="404"):
        openai_backend(refused).complete(["q"], 3)
    assert len(refused.calls) == 1  # a 4xx is not retried


# --- config, job, re-judging ------------------------------------------------------------------------------------

def composed_judge(*overrides: str) -> JudgeConfig:
    return compose_job(judge_group_overrides(list(overrides))).eval.metrics["judge"]


def test_both_override_forms_select_a_judge_and_none_is_the_default():
    assert composed_judge().name == "none"
    for form in ("eval/judge=strongreject", "eval.judge=strongreject"):
        judge = composed_judge(form, "eval.judge.backend=openai")
        assert judge.name == "strongreject" and judge.backend == "openai"
    assert judge_group_overrides(["eval.judge=yesno,rating", "eval.judge.backend=hf"]) == [
        "eval/judge=yesno,rating", "eval.judge.backend=hf"]


def test_a_judged_job_writes_judge_fields_and_rejudging_costs_nothing(tiny_folder, tmp_path, capsys):
    cfg = small_job(tiny_folder, tmp_path / "cache", "method.k=6", "eval/judge=strongreject",
                    f"eval.judge.path={tiny_folder}", "eval.judge.max_new_tokens=4", "eval.mmlu.n=0", "eval.kl.n=0",
                    "prompts.dedup=false")
    results = run(cfg, tmp_path / "run")
    assert results["judge"] == {"name": "strongreject", "backend": "hf", "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                                "rubric_version": "strongreject-v1"}
    for point in results["points"]:
        # A random tiny judge writes no rubric: every verdict is an unreadable answer, none scored 0 or 1.
        assert point["judge_parse_failures"] == 4 and point["judge_refusal_rate"] is None
        assert point["over_refusal"]["jbb_benign"]["judge_parse_failures"] == 3
    assert "judge" in results["timings_s"]
    assert all(line["judge_refused"] is None and "judge_answer" in line for line in generation_lines(tmp_path / "run"))

    rejudge = [str(tmp_path / "run"), "eval.judge=yesno", f"eval.judge.path={tiny_folder}", f"cache_dir={tmp_path}/c"]
    assert main(rejudge) == 0
    first = json.loads((tmp_path / "run" / RESULTS).read_text())
    asked, cached = map(int, re.search(r"(\d+) questions asked, (\d+) cached", capsys.readouterr().out).groups())
    assert first["judge"]["name"] == "yesno" and asked + cached == 18 and asked > 0
    for point in first["points"]:
        assert point["judge_parse_failures"] == 0 and point["judge_n"] == 4
        assert 0 <= point["judge_refusal_rate"] <= 1 and point["judge_over_refusal_rate"] is not None
    lines = [json.loads(line) for line in (tmp_path / "run" / GENERATIONS).read_text().splitlines()]
    assert len(lines) == 18 and all(0 < line["judge_score"] < 1 for line in lines)
    assert (tmp_path / "run" / "judge_vs_keyword.png").read_bytes().startswith(b"\x89PNG")
    summary = write_report(tmp_path / "run", tmp_path / "report")["summary"].read_text()
    judge_rows = summary.split("## Judge vs keyword refusal")[1].split("##")[0].strip().splitlines()[2:]
    assert len(judge_rows) == 2 and all("yesno (Qwen/Qwen2.5-Coder-0.5B-Instruct)" in row for row in judge_rows)
    assert fmt_ci(first["points"][0]["judge_refusal_rate"], first["points"][0]["judge_refusal_ci95"]) in judge_rows[0]
    assert main(rejudge) == 0
    assert "0 questions asked, 18 cached" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / RESULTS).read_text())["points"] == first["points"]


def test_rejudging_explains_bad_input_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "eval.judge=strongreject"]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "eval.judge: expected one of yesno, strongreject, rating" in capsys.readouterr().err
