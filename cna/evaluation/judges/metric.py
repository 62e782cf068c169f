"""The LLM judge as a metric: every response of a point judged beside the keyword classifier (`eval.judge`).

It runs right after the intervention is removed (the hf judge is its own model object in any case, so no
steering hook could reach it), over every response the point generated: the point gains the judge's refusal
rate and score for the harmful sets, each over-refusal set's entry the same for its set, and every
generations.jsonl line its verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cna.errors import ConfigError
from cna.evaluation.judges.backends import Backend, HFBackend, OpenAIBackend
from cna.evaluation.judges.rubrics import RUBRICS
from cna.evaluation.judges.verdicts import Judge, VerdictCache, judge_summary
from cna.evaluation.metric import DataContext, Field, Metric, register_metric
from cna.models import DTYPES
from cna.network import server_reachable
from cna.schema import bounded, choice

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext

JUDGES = ("none", "yesno", "strongreject", "rating")
BACKENDS = ("hf", "openai")


@dataclass
class JudgeConfig:
    """`eval.judge`: which rubric, asked of which backend (conf/eval/judge/*.yaml; `none` switches it off)."""

    name: str = choice("none", JUDGES)
    backend: str = choice("hf", BACKENDS)  # hf: a local transformers model; openai: any OpenAI-compatible server
    model: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # hf: a hub id (found locally first); openai: the served name
    local_name: str | None = "qwen2.5-coder-0.5b-instruct"
    path: str | None = None
    dtype: str = choice("auto", ("auto", *DTYPES))
    device: str = "auto"
    batch_size: int = bounded(8, 1, integer=True)
    max_new_tokens: int = bounded(40, 1, integer=True)
    max_response_chars: int = bounded(1200, 1, integer=True)  # responses are cut to this before the judge sees them
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    concurrency: int = bounded(8, 1, integer=True)
    timeout_s: float = bounded(120.0, 0, low_open=True)
    retries: int = bounded(3, 0, integer=True)
    cache_dir: str | None = None  # verdicts keyed by (judge model, rubric version, prompt, response); None: off


def make_judge(config: JudgeConfig) -> Judge | None:
    """The judge a config describes (None for `none`); the config is checked already."""
    if config.name == "none":
        return None
    if config.backend == "hf":
        from cna.models import ModelSpec

        spec = ModelSpec(name=config.model, local_name=config.local_name, path=config.path, dtype=config.dtype,
                         device=config.device)
        backend: Backend = HFBackend(spec, batch_size=config.batch_size)
    elif config.backend == "openai":
        backend = OpenAIBackend(base_url=config.base_url, model=config.model, api_key_env=config.api_key_env,
                                concurrency=config.concurrency, timeout_s=config.timeout_s, retries=config.retries)
    else:
        raise ConfigError(f"eval.judge.backend: expected one of {', '.join(BACKENDS)}, got {config.backend!r}")
    return Judge(RUBRICS[config.name](), backend, max_new_tokens=config.max_new_tokens,
                 max_response_chars=config.max_response_chars,
                 cache=VerdictCache(config.cache_dir) if config.cache_dir else None)


def describe(config: JudgeConfig) -> dict:
    """What results.json records about the judge that scored it."""
    return {"name": config.name, "backend": config.backend, "model": config.model,
            "rubric_version": RUBRICS[config.name]().version}


def judge_point(judge: Judge, values: dict, records: list[dict]) -> None:
    """Judge every response of one strength point, in place: each record gains its verdict, the point's values
    the judge's summary for the harmful sets (records whose set is not an over-refusal set), every
    `over_refusal` entry the same fields for its set, and the pooled `judge_over_refusal_rate`."""
    # A thinking model's reasoning never reaches the judge: it reads the answer (cna.reasoning).
    verdicts = judge([r["prompt"] for r in records], [r.get("answer", r["response"]) for r in records])
    for record, verdict in zip(records, verdicts, strict=True):
        record.update(verdict.record())
    over_refusal = values.get("over_refusal") or {}
    harmful = [v for r, v in zip(records, verdicts, strict=True) if r["set"] not in over_refusal]
    values.update(judge_summary(harmful))
    for name, entry in over_refusal.items():
        entry.update(judge_summary([v for r, v in zip(records, verdicts, strict=True) if r["set"] == name]))
    pooled = judge_summary([v for r, v in zip(records, verdicts, strict=True) if r["set"] in over_refusal])
    values.update(judge_over_refusal_rate=pooled["judge_refusal_rate"],
                  judge_over_refusal_ci95=pooled["judge_refusal_ci95"])


@register_metric
class JudgeMetric(Metric):
    name = "judge"
    config_type = JudgeConfig
    order = 11  # right after refusal, before the three-way verdicts (cna.evaluation.compliance) read its items
    steered = False
    logged_when = "logged only when eval.judge is set (the LLM judge)"
    fields = (
        Field("judge_refusal_rate", "judge refusal", "judge_refusal_ci95", table=False,  # the report's judge section
              about="The LLM judge's refusal rate on the harmful sets."),
        Field("judge_score", "judge score", "judge_score_ci95", table=False,
              about="The judge's mean response score, 0 refused or useless .. 1 full help."),
    )

    def __init__(self, config: JudgeConfig):
        self.config = config
        self._judge: Judge | None = None  # loaded at its first use, so its load time counts as judging

    @classmethod
    def check(cls, config: JudgeConfig) -> None:
        """The backend's needs, before any model loads: a model name, a server that answers, a local folder."""
        if config.name == "none":
            return
        if not config.model:
            raise ConfigError(f"eval.judge.model: expected a hub id, a folder or a served model name, got "
                              f"{config.model!r}")
        if config.backend == "openai":
            if not str(config.base_url or "").startswith(("http://", "https://")):
                raise ConfigError("eval.judge.base_url: expected an http(s) URL of an OpenAI-compatible server, e.g. "
                                  f"http://127.0.0.1:8000/v1, got {config.base_url!r}")
            if not server_reachable(config.base_url):
                raise ConfigError(f"eval.judge.base_url: nothing answers at {config.base_url} (start the server, "
                                  "e.g. `vllm serve MODEL`, or set eval.judge.base_url)")
        if config.backend == "hf" and config.path is not None and not (Path(config.path).expanduser()
                                                                        / "config.json").is_file():
            raise ConfigError(f"eval.judge.path: expected a model folder with a config.json, got {config.path!r}")

    @classmethod
    def from_config(cls, config: JudgeConfig, data: DataContext) -> JudgeMetric | None:
        return None if config.name == "none" else cls(config)

    def identity(self) -> dict:
        return describe(self.config) | {"max_response_chars": self.config.max_response_chars}

    def measure(self, point: PointContext) -> dict:
        if not point.records:
            return {}
        if self._judge is None:
            self._judge = make_judge(self.config)
        judge_point(self._judge, point.values, point.records)
        return {}  # judge_point wrote into the point's values and records

    def results(self) -> dict:
        return {"judge": describe(self.config)}
