"""Behaviours beyond refusal (issue 25): the behaviour group composes and validates for every built-in behaviour,
each held-out evaluation split is disjoint from its discovery split, the metrics score what they claim, and a
custom behaviour runs end to end on the tiny model with its fields in results.json, generations and the report."""

from __future__ import annotations

import json

import pytest
import torch
from test_pipeline import generation_lines, run

from cna.config import compose_job
from cna.data import deduplicate, load_prompts, packaged_rows
from cna.errors import ConfigError
from cna.evaluation.behaviours import Language, Match, MatchConfig, Sentiment
from cna.evaluation.metric import EvalSet
from cna.evaluation.next_token import NextToken, read_token_rows, token_scores
from cna.report import write_report
from cna.run_folder import RESULTS, config_sha256
from cna.tracking.wandb_run import _tags
from cna.validation import validate
from conftest import data_dir

BUILT_IN = ("capitals", "sva", "language", "sentiment")


def _eval_prompts(job) -> list[str]:
    metric = job.eval.metrics[job.behaviour.metric]
    sets = [metric.target, metric.control]
    prompts = []
    for entry in sets:
        if entry.n != 0:
            prompts += (load_prompts(entry.source) if job.behaviour.metric != "next_token"
                        else [row.prompt for row in read_token_rows(entry.source, "test")])
    return prompts


@pytest.mark.parametrize("behaviour", BUILT_IN)
def test_each_built_in_behaviour_composes_validates_and_holds_out_its_evaluation(behaviour):
    job = compose_job([f"behaviour={behaviour}", f"data_dir={data_dir()}"])
    validate(job)
    assert job.behaviour.name == behaviour and job.behaviour.metric in job.eval.metrics
    assert "refusal" not in job.eval.metrics and job.eval.metrics["kl"].n > 0
    discovery = load_prompts(job.prompts.positive) + load_prompts(job.prompts.negative)
    evaluated = _eval_prompts(job)
    assert len(evaluated) >= 32 and not set(discovery) & set(evaluated)
    # The pipeline's own test (cna.data.deduplicate at the behaviour's threshold) finds no copy either.
    assert deduplicate(discovery, evaluated, job.prompts.dedup_threshold).removed == 0
    assert job.prompts.dedup


def test_capitals_and_sva_split_by_country_and_head_noun_with_intervals_under_a_tenth():
    discovery = {row["prompt"].removeprefix("The capital of ").removesuffix(" is")
                 for row in packaged_rows("capitals", "positive")}
    held_out = [row["prompt"].removeprefix("The capital of ").removesuffix(" is")
                for row in packaged_rows("capitals_eval", "positive")]
    assert len(held_out) == 100 and not discovery & set(held_out)
    heads = {row["prompt"].split()[1] for row in packaged_rows("sva", "positive")}
    eval_heads = {row["prompt"].split()[1] for row in packaged_rows("sva_eval", "positive")}
    assert not heads & eval_heads and len(packaged_rows("sva_eval", "negative")) == 100
    # 100 rows: a Wilson interval is at most +-0.098 wide on each side, whatever the accuracy.
    scores = token_scores(torch.zeros(100, 4), [0] * 50 + [1] * 50, [2] * 100, accuracy="pairwise")
    assert scores.ci95[1] - scores.ci95[0] < 0.2


def test_token_scores_count_top1_and_pairwise_accuracy_and_the_mean_logit_difference():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 0.5, 0.0]])
    targets, others = [0, 1, 1], [1, 0, 0]
    top1 = token_scores(logits, targets, others, accuracy="top1")
    pairwise = token_scores(logits, targets, others, accuracy="pairwise")
    assert top1.accuracy == pytest.approx(1 / 3)  # row 1's answer is beaten by a third token
    assert pairwise.accuracy == pytest.approx(2 / 3)  # rows 0 and 1 outscore the counterfactual
    assert top1.logit_diff == pytest.approx((2.0 + 2.0 - 0.5) / 3) and top1.n == 3
    with pytest.raises(ConfigError, match="accuracy"):
        NextToken({"target": []}, accuracy="top5")


def test_response_scorers_find_the_language_the_sentiment_and_the_patterns():
    language = Language({"target": ["q"]}, "fr")
    found, values = language.score(["a", "b"], ["Bien sûr ! Voici une recette simple pour faire du pain à la maison.",
                                                "Sure! Here is a simple recipe for baking bread at home."])
    assert found == ["fr", "en"] and values["language_rate"] == 0.5
    sentiment = Sentiment({"target": ["q"]})
    compounds, values = sentiment.score(["a", "b"], ["What a wonderful, delightful and happy day!",
                                                     "This is a terrible, awful and miserable place."])
    assert compounds[0] > 0.5 > -0.5 > compounds[1] and values["positive_rate"] == 0.5
    match = Match({"target": ["q"]}, [r"\barr+\b"], regex=True)
    assert match.score(["a", "b"], ["Arrr, matey", "Hello there"])[0] == [True, False]
    with pytest.raises(ConfigError, match="eval.match.patterns"):
        Match.check(MatchConfig(target=EvalSet(n=3), patterns=["(unclosed"], regex=True))
    Match.check(MatchConfig())  # switched off (n 0): nothing to check


def test_the_behaviour_is_a_label_refusal_is_the_default_and_config_hashes_ignore_it():
    default, refusal = compose_job([]), compose_job(["behaviour=refusal"])
    assert default.behaviour == refusal.behaviour and default.behaviour.name == "refusal"
    assert default.settings == refusal.settings
    relabelled = dict(default.settings, behaviour={"name": "other"})
    assert config_sha256(relabelled) == config_sha256(default.settings)
    assert _tags("Qwen/Qwen2.5-Coder-0.5B-Instruct", "cna", "capitals") == [
        "Qwen2.5-Coder-0.5B-Instruct", "cna", "behaviour:capitals"]


@pytest.mark.parametrize("method", ["caa", "direction"])
def test_residual_methods_take_multipliers_for_induction(method):
    """m = 2, 4 induce with CAA (its vector added) and directional ablation (the projection scaled): both validate."""
    job = compose_job([f"method={method}", "multipliers=[1.0,0.0,2.0,4.0]", f"data_dir={data_dir()}"])
    assert validate(job).takes_multipliers() and job.sweep.multipliers == [1.0, 0.0, 2.0, 4.0]


def test_a_behaviour_naming_a_metric_the_job_does_not_measure_stops_in_one_line():
    with pytest.raises(ConfigError, match=r"^behaviour.metric: expected a metric this job measures"):
        validate(compose_job(["behaviour=capitals", "behaviour.metric=language", f"data_dir={data_dir()}"]))
    with pytest.raises(ConfigError, match=r"^behaviour.remove.field: expected a point field"):
        validate(compose_job(["behaviour=capitals", "behaviour.remove.field=capital_rate", f"data_dir={data_dir()}"]))


def behaviour_job(tiny_folder, cache, *overrides):
    """A behaviour job on the tiny model at test sizes (a behaviour's eval has no refusal sets to size)."""
    return compose_job(["model=tiny_random", f"model.path={tiny_folder}", f"data_dir={data_dir()}",
                        f"cache_dir={cache}", "logger=none", "eval.kl.n=3", "max_new_tokens=4", "batch_size=4",
                        "alphas=[0.0,1.0]", *overrides])


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_custom_behaviour_runs_end_to_end_and_reaches_results_generations_and_the_report(tiny_folder, tmp_path):
    pos = _write(tmp_path / "pos.txt", [f"w{i} w{i + 1} w7" for i in range(10, 22)])
    neg = _write(tmp_path / "neg.txt", [f"w{i} w{i + 1} w8" for i in range(10, 22)])
    pos_eval = _write(tmp_path / "pos_eval.txt", [f"w{i} w7" for i in range(30, 36)])
    neg_eval = _write(tmp_path / "neg_eval.txt", [f"w{i} w8" for i in range(30, 36)])
    job = behaviour_job(tiny_folder, tmp_path / "cache", "behaviour=custom", f"prompts.positive.path={pos}",
                    f"prompts.negative.path={neg}", "prompts.n_positive=null", "prompts.n_negative=null",
                    f"eval.match.target.source.path={pos_eval}", f"eval.match.control.source.path={neg_eval}",
                    "eval.match.patterns=[w5, w6]", "method=caa", "multipliers=[1.0,0.0,2.0]",
                    "eval.mmlu.n=0")
    results = run(job, tmp_path / "run")
    assert results["behaviour"] == "custom" and results["behaviour_metric"] == "match"
    assert results["behaviour_effects"]["remove"] == {"field": "target_match_rate", "expect": "decrease"}
    assert results["discovery_overlap"] == {"match_target": 0, "match_control": 0, "kl": 0}
    assert [p["multiplier"] for p in results["points"]] == [1.0, 0.0, 2.0]
    assert [p["alpha"] for p in results["points"]] == [0.0, 1.0, -1.0]  # CAA induction adds the vector
    for point in results["points"]:
        assert 0 <= point["target_match_rate"] <= 1 and point["n_target"] == 6 and point["n_control"] == 6
        assert point["target_match_rate_ci95"][0] <= point["target_match_rate"] <= point["target_match_rate_ci95"][1]
        assert point["quality"] is not None and point["refusal_rate"] is None
    assert results["points"][2]["kl_divergence"] > 0
    lines = generation_lines(tmp_path / "run")
    assert {line["set"] for line in lines} == {"match_target", "match_control"} and len(lines) == 3 * 12
    assert all(isinstance(line["match"], bool) for line in lines)
    summary = write_report(tmp_path / "run", tmp_path / "report")["summary"].read_text()
    assert "| behaviour |" in summary and "| custom |" in summary
    assert "## Behaviours: expected effects" in summary and "target_match_rate" in summary
    assert json.loads((tmp_path / "run" / RESULTS).read_text()) == results


def test_next_token_behaviour_on_the_tiny_model_scores_answer_tokens(tiny_folder, tmp_path):
    rows = [{"prompt": f"w{i} w7", "target": " w10", "counterfactual": " w11"} for i in range(20, 26)]
    # The control set asks the same prompts with the answers swapped, so its logit difference is exactly minus.
    other = [{"prompt": f"w{i} w7", "target": " w11", "counterfactual": " w10"} for i in range(20, 26)]
    for name, data in (("target", rows), ("control", other)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    pos = _write(tmp_path / "pos.txt", [f"w{i} w7" for i in range(30, 40)])
    neg = _write(tmp_path / "neg.txt", [f"w{i} w8" for i in range(30, 40)])
    job = behaviour_job(tiny_folder, tmp_path / "cache", "behaviour=custom", f"prompts.positive.path={pos}",
                    f"prompts.negative.path={neg}", "prompts.n_positive=null", "prompts.n_negative=null",
                    "eval.match.target.n=0", "eval.match.control.n=0", "+metric@eval.next_token=next_token",
                    f"eval.next_token.target.source.path={tmp_path / 'target.jsonl'}",
                    f"eval.next_token.control.source.path={tmp_path / 'control.jsonl'}",
                    "behaviour.metric=next_token", "behaviour.remove.field=target_accuracy",
                    "behaviour.induce.field=control_logit_diff", "model.template=raw", "method.k=4",
                    "prompts.dedup_threshold=1.0",
                    "eval.mmlu.n=0")
    results = run(job, tmp_path / "run")
    baseline, ablated = results["points"]
    assert baseline["n_target"] == ablated["n_control"] == 6 and "quality" in baseline
    # One answer pair for every row: the logit difference of the target set is minus the control set's.
    assert baseline["target_logit_diff"] == pytest.approx(-baseline["control_logit_diff"], abs=1e-4)
    assert ablated["target_logit_diff"] != pytest.approx(baseline["target_logit_diff"])
    assert not (tmp_path / "run" / "generations.jsonl").exists() or not generation_lines(tmp_path / "run")
