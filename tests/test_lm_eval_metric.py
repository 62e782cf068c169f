"""The lm_eval metric: lm-evaluation-harness tasks under the intervention, on a local task built from MMLU files.

Offline throughout: the task is written at test time from a handful of $CNA_DATA_DIR/mmlu questions with cna's
own prompt (cna.evaluation.lm_eval.write_mmlu_task), and the model is the tiny random Llama.
"""

import json
import sys
from pathlib import Path

import pytest
import transformers
from test_pipeline import small_job

import cna
from cna import pipeline
from cna.errors import ConfigError
from cna.evaluation.lm_eval import LmEval, point_fields, write_mmlu_task
from cna.evaluation.mmlu import load_mmlu_folder, stratified_sample
from cna.report import write_report
from cna.run_folder import RESULTS
from conftest import data_dir

TASK = "cna_mmlu_local"
ACC = f"lm_eval/{TASK}/acc"


@pytest.fixture(scope="module")
def mmlu_task(tmp_path_factory) -> Path:
    """A local lm-eval task over 8 MMLU test questions, with 4 dev questions to draw few-shot examples from."""
    folder = data_dir() / "mmlu"
    questions = stratified_sample(load_mmlu_folder(folder, "test"), 8, seed=0)
    dev = load_mmlu_folder(folder, "dev")[:4]
    return write_mmlu_task(questions, tmp_path_factory.mktemp("lm_eval_tasks"), fewshot=dev)


def loglikelihoods(metric: LmEval, alpha: float) -> list[list[float]]:
    """Per question, the log-likelihood of " A".." D" as lm-eval scored them at one point."""
    return [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in metric.per_question[alpha][TASK]]


def forbid_loading(monkeypatch) -> None:
    """From here on, any model or tokenizer load fails: lm-eval must work on the object it was given."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model or tokenizer was loaded again")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def test_steering_reaches_lm_eval_through_our_model_object_and_alpha_0_is_the_plain_model(
        tiny_folder, mmlu_task, monkeypatch):
    model, tokenizer = cna.load_model(str(tiny_folder))
    positive = [f"w{i} w{i + 1} w{i + 2} yes" for i in range(4, 40, 3)]
    negative = [f"w{i + 2} w{i} no" for i in range(4, 40, 3)]
    circuit = cna.discover(model, tokenizer, positive, negative, k=24, universal=False, progress=False)
    forbid_loading(monkeypatch)

    steered = LmEval([TASK], include_path=str(mmlu_task), batch_size=4)
    results = cna.evaluate(model, tokenizer, [steered], alphas=[0.0, 1.0], intervention=circuit, progress=False)
    plain = LmEval([TASK], include_path=str(mmlu_task), batch_size=4)
    unsteered = cna.evaluate(model, tokenizer, [plain], alphas=[0.0], progress=False)  # after the hooks are gone

    assert steered.wrapper.model is model and plain.wrapper.model is model
    assert steered.wrapper.tokenizer is tokenizer
    at_0, at_1 = results.points
    assert at_0.value(f"lm_eval/{TASK}/n") == at_1.value(f"lm_eval/{TASK}/n") == 8
    # alpha = 0 is the plain model, bit for bit; alpha = 1 ablates 24 neurons and moves every question's scores.
    assert loglikelihoods(steered, 0.0) == loglikelihoods(plain, 0.0)
    assert at_0.value(ACC) == unsteered.points[0].value(ACC)
    moved = [max(abs(a - b) for a, b in zip(q0, q1, strict=True))
             for q0, q1 in zip(loglikelihoods(steered, 0.0), loglikelihoods(steered, 1.0), strict=True)]
    assert min(moved) > 1e-4


def test_generation_tasks_generate_with_the_steered_model(tiny_folder, tmp_path):
    """A generate_until task (the kind GSM8K and IFEval are): lm-eval's generations follow the intervention."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"prompt": f"w{4 + i} w{9 + i} w{20 + i}", "target": "yes"}) + "\n"
                            for i in range(8)))
    (tmp_path / "tiny_gen.yaml").write_text(json.dumps({
        "task": "tiny_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    model, tokenizer = cna.load_model(str(tiny_folder))
    positive = [f"w{i} w{i + 1} w{i + 2} yes" for i in range(4, 40, 3)]
    negative = [f"w{i + 2} w{i} no" for i in range(4, 40, 3)]
    circuit = cna.discover(model, tokenizer, positive, negative, k=24, universal=False, progress=False)
    steered, plain = (LmEval(["tiny_gen"], include_path=str(tmp_path)) for _ in range(2))
    results = cna.evaluate(model, tokenizer, [steered], alphas=[0.0, 1.0], intervention=circuit, progress=False)
    cna.evaluate(model, tokenizer, [plain], alphas=[0.0], progress=False)

    def generations(metric, alpha):
        return [sample["filtered_resps"][0] for sample in metric.per_question[alpha]["tiny_gen"]]

    assert results.points[1].value("lm_eval/tiny_gen/n") == 8
    assert generations(steered, 0.0) == generations(plain, 0.0)
    assert generations(steered, 1.0) != generations(steered, 0.0)


def test_a_job_records_lm_eval_fields_with_intervals_in_results_json(tiny_folder, mmlu_task, tmp_path):
    lm_eval = ["+metric@eval.lm_eval=lm_eval", f"eval.lm_eval.tasks=[{TASK}]", f"eval.lm_eval.include_path={mmlu_task}",
               "eval.lm_eval.limit=6", "eval.refusal.n=1", "eval.over_refusal.jbb_benign.n=0",
               "eval.over_refusal.xstest_safe.n=0", "eval.kl.n=0"]
    pipeline.run(small_job(tiny_folder, tmp_path / "cache", *lm_eval, "method.k=24", "method.universal.enabled=false"),
                 tmp_path / "cna")
    saved = json.loads((tmp_path / "cna" / RESULTS).read_text())

    assert saved["lm_eval"]["tasks"][TASK] == {"version": 1.0, "num_fewshot": 0, "output_type": "multiple_choice"}
    assert saved["timings_s"]["lm_eval"] > 0
    for point in saved["points"]:
        accuracy, stderr = point[ACC], point[f"{ACC}_stderr"]
        assert point[f"lm_eval/{TASK}/n"] == 6 and accuracy in {i / 6 for i in range(7)}
        assert point[f"{ACC}_ci95"] == pytest.approx([accuracy - 1.96 * stderr, accuracy + 1.96 * stderr])
    # The same questions on the plain model: the job's alpha = 0 point is the unsteered model's accuracy.
    model, tokenizer = cna.load_model(str(tiny_folder))
    plain = cna.evaluate(model, tokenizer, [LmEval([TASK], include_path=str(mmlu_task), limit=6)], alphas=[0.0],
                         progress=False)
    assert saved["points"][0]["alpha"] == 0.0 and saved["points"][0][ACC] == plain.points[0].value(ACC)
    # The report's points table has a column per task metric, with its interval.
    summary = write_report(tmp_path / "cna", tmp_path / "report")["summary"].read_text()
    assert f"| {ACC.removeprefix('lm_eval/')} [95% CI] |" in summary
    # Another recipe's job reuses that unsteered point from the baseline cache: lm-eval's requests hash the same.
    pipeline.run(small_job(tiny_folder, tmp_path / "cache", *lm_eval, "method=caa"), tmp_path / "caa")
    reused = json.loads((tmp_path / "caa" / RESULTS).read_text())["points"][0]
    assert reused["reused"] is True and reused[ACC] == saved["points"][0][ACC]


def test_limit_and_num_fewshot_reach_lm_eval(tiny_folder, mmlu_task):
    model, tokenizer = cna.load_model(str(tiny_folder))
    zero = LmEval([TASK], include_path=str(mmlu_task), limit=3)
    two = LmEval([TASK], include_path=str(mmlu_task), limit=3, num_fewshot=2)
    cna.evaluate(model, tokenizer, [zero, two], alphas=[0.0], progress=False)

    assert [len(m.per_question[0.0][TASK]) for m in (zero, two)] == [3, 3]
    assert [m.results()["lm_eval"]["tasks"][TASK]["num_fewshot"] for m in (zero, two)] == [0, 2]
    assert zero.identity()["requests"] != two.identity()["requests"]  # two solved examples precede each question
    assert loglikelihoods(zero, 0.0) != loglikelihoods(two, 0.0)


def test_lm_eval_results_become_point_fields_named_by_task_filter_and_metric():
    results = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.75, "acc_stderr,none": 0.05, "acc_norm,none": 0.5,
                     "acc_norm_stderr,none": "N/A"},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
        },
        "n-samples": {"piqa": {"original": 1838, "effective": 100}, "gsm8k": {"original": 1319, "effective": 40}},
    }
    assert point_fields(results) == {
        "lm_eval/piqa/acc": 0.75, "lm_eval/piqa/acc_stderr": 0.05,
        "lm_eval/piqa/acc_ci95": [0.75 - 1.96 * 0.05, 0.75 + 1.96 * 0.05], "lm_eval/piqa/acc_norm": 0.5,
        "lm_eval/piqa/n": 100,
        "lm_eval/gsm8k/strict-match/exact_match": 0.25, "lm_eval/gsm8k/strict-match/exact_match_stderr": 0.1,
        "lm_eval/gsm8k/strict-match/exact_match_ci95": [0.25 - 1.96 * 0.1, 0.25 + 1.96 * 0.1], "lm_eval/gsm8k/n": 40,
    }


@pytest.mark.parametrize(("overrides", "message"), [
    ([], "eval.lm_eval.tasks: expected a list of lm-eval task names (e.g. [piqa]), got []"),
    (["eval.lm_eval.tasks=[piqa]", "eval.lm_eval.include_path=/nonexistent/tasks"],
     "eval.lm_eval.include_path: expected a folder of lm-eval task YAMLs, got '/nonexistent/tasks' (not a folder)"),
    ([f"eval.lm_eval.tasks=[{TASK}x]", "INCLUDE"],
     f"eval.lm_eval.tasks: '{TASK}x' is not an lm-eval task, group or tag (did you mean {TASK}"),
])
def test_bad_lm_eval_settings_stop_in_one_line_before_the_model_loads(overrides, message, tiny_folder, mmlu_task,
                                                                      tmp_path, monkeypatch):
    overrides = [f"eval.lm_eval.include_path={mmlu_task}" if o == "INCLUDE" else o for o in overrides]
    job = small_job(tiny_folder, tmp_path / "cache", "+metric@eval.lm_eval=lm_eval", *overrides)
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError) as error:
        pipeline.run(job, tmp_path / "run")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_without_lm_eval_installed_the_metric_says_how_to_install_it(tiny_folder, tmp_path, monkeypatch):
    job = small_job(tiny_folder, tmp_path / "cache", "+metric@eval.lm_eval=lm_eval", "eval.lm_eval.tasks=[piqa]")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError) as error:
        pipeline.run(job, tmp_path / "run")
    assert str(error.value) == "eval.lm_eval: lm-evaluation-harness is not installed; pip install 'cna[lm_eval]'"
