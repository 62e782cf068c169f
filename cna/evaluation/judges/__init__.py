"""LLM judges of (request, response) pairs: one protocol, three rubrics, two backends, a verdict cache, and the
judge metric (`eval.judge`).

- `rubrics`: the questions and how answers are read (StrongREJECT, a 1-10 rating, yes/no);
- `backends`: a local transformers model or an OpenAI-compatible server;
- `verdicts`: the judge with its on-disk cache and retry, and summaries of verdicts;
- `yesno`: the next-token yes/no compliance judge;
- `metric`: the judge as a metric of a job.
"""

from cna.evaluation.judges.backends import Backend, HFBackend, OpenAIBackend
from cna.evaluation.judges.metric import BACKENDS, JUDGES, JudgeConfig, JudgeMetric, describe, judge_point, make_judge
from cna.evaluation.judges.rubrics import RUBRICS, RatingRubric, Rubric, StrongRejectRubric, Verdict, YesNoRubric
from cna.evaluation.judges.verdicts import (
    Judge,
    VerdictCache,
    cohen_kappa,
    judge_summary,
    kappa_interval,
    verdict_key,
)
from cna.evaluation.judges.yesno import JUDGE_QUESTION, LLMRefusalJudge

__all__ = ["BACKENDS", "JUDGES", "JUDGE_QUESTION", "RUBRICS", "Backend", "HFBackend", "Judge", "JudgeConfig",
           "JudgeMetric", "LLMRefusalJudge", "OpenAIBackend", "RatingRubric", "Rubric", "StrongRejectRubric",
           "Verdict", "VerdictCache", "YesNoRubric", "cohen_kappa", "describe", "judge_point", "judge_summary",
           "kappa_interval", "make_judge", "verdict_key"]
