"""EleutherAI's lm-evaluation-harness under the intervention: the `lm_eval` metric (`eval.lm_eval`).

lm-eval's Hugging Face wrapper (`HFLM`) is built around the job's own model object and tokenizer, never a path,
so it loads and copies nothing: the steering hooks (or baked weights) in place at a point hold for every forward
pass and generation lm-eval makes there. Any lm-eval task runs: the harness's own (piqa, gsm8k, ifeval, mmlu, ...
where their datasets can be had) and local task YAMLs under `include_path`. The tasks, their datasets and their
prompts are loaded before any model loads, so a misspelt task or an unreachable dataset stops the job in one line.

Each point gets, per task (and group) and metric, `lm_eval/<task>/<metric>` (`lm_eval/<task>/<filter>/<metric>`
where the task filters its responses, e.g. gsm8k's strict-match), its standard error `..._stderr` and 95% interval
`..._ci95` = value +- 1.96 stderr where lm-eval gives one (its normal approximation, not clipped), and
`lm_eval/<task>/n`, the questions scored. `per_question[alpha][task]` keeps lm-eval's per-question responses
(log-likelihoods, generations) of the last run of each point, for notebooks.

lm-eval is an optional extra: pip install 'cna[lm_eval]'.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cna.errors import CnaError, ConfigError
from cna.evaluation.metric import DataContext, Field, Metric, register_metric
from cna.evaluation.mmlu import LETTERS, MmluQuestion
from cna.schema import bounded

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext, Session

log = logging.getLogger(__name__)

INSTALL = "pip install 'cna[lm_eval]'"
Z95 = 1.96
NO_FILTER = "none"  # lm-eval's filter name for responses taken as they are


@dataclass
class LmEvalConfig:
    """`eval.lm_eval`: lm-eval tasks run at every strength point."""

    tasks: list[str] = field(default_factory=list)  # task, group or tag names, e.g. [piqa, gsm8k]
    include_path: str | None = None  # a folder of local task YAMLs (searched before lm-eval's own tasks)
    limit: int | None = bounded(None, 1, integer=True)  # questions per task, the first ones (null: all)
    num_fewshot: int | None = bounded(None, 0, integer=True)  # null: each task's own default
    # lm-eval holds batch x length x vocabulary log-probabilities (8 x 650 x 152k floats: 3 GiB on MMLU with Qwen)
    batch_size: int = bounded(8, 1, integer=True)
    apply_chat_template: bool = False  # wrap each request in the tokenizer's chat template (few-shot as turns)
    bootstrap_iters: int = bounded(100000, 0, integer=True)  # for metrics whose stderr has no closed form; 0: none


def lm_eval_missing() -> bool:
    """True where lm-evaluation-harness cannot be imported (it is an optional extra)."""
    try:
        return importlib.util.find_spec("lm_eval") is None
    except (ImportError, ValueError):
        return True


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def task_manager(names: Sequence[str], include_path: str | None):
    """lm-eval's task index holding every name: the local folder alone when it has them all (indexing lm-eval's
    own ~15k task files takes seconds), else with lm-eval's own tasks; ConfigError naming an unknown name."""
    from lm_eval.tasks import TaskManager

    include_path = str(Path(include_path).expanduser()) if include_path else None
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or set(names) - set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"eval.lm_eval.tasks: '{name}' is not an lm-eval task, group or tag{hint}")
    return manager


def point_fields(results: dict) -> dict[str, Any]:
    """lm-eval's results as point fields: `lm_eval/<task>[/<filter>]/<metric>`, `_stderr`, `_ci95`, and `/n`."""
    fields: dict[str, Any] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            name = f"lm_eval/{task}/{metric}" if filter_name == NO_FILTER else f"lm_eval/{task}/{filter_name}/{metric}"
            fields[name] = float(value)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            if isinstance(stderr, int | float):
                fields[f"{name}_stderr"] = float(stderr)
                fields[f"{name}_ci95"] = [float(value) - Z95 * float(stderr), float(value) + Z95 * float(stderr)]
        counted = results.get("n-samples", {}).get(task)
        if counted:
            fields[f"lm_eval/{task}/n"] = int(counted["effective"])
    return fields


# cna.evaluation.mmlu.mmlu_prompt as an lm-eval template: subject header, question, lettered choices, "Answer:".
MMLU_PROMPT = ("The following are multiple choice questions (with answers) about {{subject | replace('_', ' ')}}.\n\n"
               "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\n"
               "Answer:")


def write_mmlu_task(questions: Sequence[MmluQuestion], folder: str | Path, *, fewshot: Sequence[MmluQuestion] = (),
                    task: str = "cna_mmlu_local") -> Path:
    """A local lm-eval task over these MMLU questions with cna's zero-shot prompt, scored as MMLU is here (the
    log-likelihood of " A".." D"): `folder` holds its YAML and data, for `include_path`. `fewshot` questions make
    a split lm-eval draws `num_fewshot` examples from. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"test": questions, **({"dev": fewshot} if fewshot else {})}
    for split, rows in splits.items():
        with (folder / f"{task}_{split}.jsonl").open("w", encoding="utf-8") as handle:
            for q in rows:
                handle.write(json.dumps({"subject": q.subject, "question": q.question, "choices": list(q.choices),
                                         "answer": q.answer}) + "\n")
    config = {"task": task, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {s: str((folder / f"{task}_{s}.jsonl").resolve()) for s in splits}},
              "test_split": "test", **({"fewshot_split": "dev"} if fewshot else {}), "output_type": "multiple_choice",
              "doc_to_text": MMLU_PROMPT, "doc_to_choice": list(LETTERS), "target_delimiter": " ",
              "doc_to_target": "answer", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                          "higher_is_better": True}],
              "metadata": {"version": 1.0}}
    (folder / f"{task}.yaml").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return folder


def _per_question(samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples without the documents and hashes: what the model answered, and how it scored."""
    dropped = {"doc", "arguments", "resps", "doc_hash", "prompt_hash", "target_hash"}
    return [{key: value for key, value in sample.items() if key not in dropped} for sample in samples]


@register_metric
class LmEval(Metric):
    """lm-evaluation-harness tasks under the intervention: capability checks beyond MMLU in one override."""

    name = "lm_eval"
    config_type = LmEvalConfig
    order = 70  # after the built-in metrics it checks capability beside (MMLU, KL), before the judge

    @classmethod
    def measured_fields(cls, keys: set[str]) -> tuple[Field, ...]:
        """One column per task metric the points carry (the tasks are settings, so the fields are too)."""
        values = sorted(key for key in keys if key.startswith("lm_eval/") and not key.endswith(("_stderr", "_ci95"))
                        and not key.endswith("/n"))
        return tuple(Field(key, key.removeprefix("lm_eval/"), f"{key}_ci95" if f"{key}_ci95" in keys else None)
                     for key in values)

    def __init__(self, tasks: Sequence[str], *, include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 8, apply_chat_template: bool = False,
                 bootstrap_iters: int = 100000, seed: int = 0):
        """Index and load the tasks (their datasets and few-shot settings): before any model loads."""
        self.check(LmEvalConfig(list(tasks), include_path))
        self.names, self.include_path, self.limit = list(tasks), include_path, limit
        self.num_fewshot, self.batch_size, self.seed = num_fewshot, batch_size, seed
        self.apply_chat_template, self.bootstrap_iters = apply_chat_template, bootstrap_iters
        manager = task_manager(self.names, include_path)
        loaded: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
        for name in self.names:
            try:
                one = manager.load([name])
            except Exception as error:  # noqa: BLE001 - dataset downloads and task YAMLs fail in many ways
                raise ConfigError(f"eval.lm_eval.tasks: lm-eval could not load '{name}': "
                                  f"{_first_line(error)}") from error
            for part in loaded:
                loaded[part].update(one[part])
        self.task_dict = loaded
        for task in loaded["tasks"].values():
            self._set_fewshot(task)
        self.wrapper = None  # lm-eval's HFLM around the session's model, built in setup
        self.per_question: dict[float, dict[str, list[dict]]] = {}

    def _set_fewshot(self, task) -> None:
        """`num_fewshot` over each task's default, as lm-eval's simple_evaluate does (a task pinned to 0 stays 0)."""
        default = task.get_config("num_fewshot")
        if self.num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=self.num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)

    @classmethod
    def check(cls, config: LmEvalConfig) -> None:
        if lm_eval_missing():
            raise ConfigError(f"eval.lm_eval: lm-evaluation-harness is not installed; {INSTALL}")
        if not config.tasks:
            raise ConfigError(f"eval.lm_eval.tasks: expected a list of lm-eval task names (e.g. [piqa]), "
                              f"got {config.tasks!r}")
        if config.include_path is not None and not Path(config.include_path).expanduser().is_dir():
            raise ConfigError(f"eval.lm_eval.include_path: expected a folder of lm-eval task YAMLs, got "
                              f"'{config.include_path}' (not a folder)")

    @classmethod
    def from_config(cls, config: LmEvalConfig, data: DataContext) -> LmEval:
        return cls(config.tasks, include_path=config.include_path, limit=config.limit,
                   num_fewshot=config.num_fewshot, batch_size=config.batch_size,
                   apply_chat_template=config.apply_chat_template, bootstrap_iters=config.bootstrap_iters,
                   seed=data.seed)

    def _requests_sha256(self) -> str:
        """The exact requests lm-eval will make (contexts, continuations, generation settings), hashed."""
        digest = hashlib.sha256()
        for name, task in sorted(self.task_dict["tasks"].items()):
            task.set_fewshot_seed(self.seed)
            task.build_all_requests(limit=self._limit(task), apply_chat_template=False)
            requests = [(i.request_type, i.doc_id, i.idx, i.args) for i in task.instances]
            digest.update(json.dumps([name, task.VERSION, requests], sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def _limit(self, task) -> int | None:
        return None if self.limit is None else min(self.limit, len(task.eval_docs))

    def identity(self) -> dict:
        return {"tasks": self.names, "limit": self.limit, "num_fewshot": self.num_fewshot,
                "apply_chat_template": self.apply_chat_template, "bootstrap_iters": self.bootstrap_iters,
                "lm_eval": version("lm_eval"), "requests": self._requests_sha256()}

    def setup(self, session: Session) -> None:
        """lm-eval's HF wrapper around the loaded model object itself: no path, so nothing is loaded again."""
        from lm_eval.models.huggingface import HFLM

        self.wrapper = HFLM(pretrained=session.model, tokenizer=session.tokenizer, batch_size=self.batch_size)
        if self.wrapper.model is not session.model:
            raise CnaError("lm-eval's HFLM does not hold the job's model object: steering would not reach it")

    def measure(self, point: PointContext) -> dict[str, Any]:
        from lm_eval.evaluator import evaluate

        if self.wrapper is None:
            self.setup(point.session)
        for task in self.task_dict["tasks"].values():
            task.set_fewshot_seed(self.seed)  # every point sees the same few-shot examples
        results = evaluate(lm=self.wrapper, task_dict=self.task_dict, limit=self.limit,
                           bootstrap_iters=self.bootstrap_iters, log_samples=True,
                           apply_chat_template=self.apply_chat_template,
                           fewshot_as_multiturn=self.apply_chat_template)
        self.per_question[point.alpha] = {task: _per_question(samples)
                                          for task, samples in results.get("samples", {}).items()}
        return point_fields(results)

    def results(self) -> dict[str, Any]:
        tasks = self.task_dict["tasks"]
        return {"lm_eval": {"version": version("lm_eval"), "limit": self.limit,
                            "tasks": {name: {"version": task.VERSION, "num_fewshot": task.get_config("num_fewshot"),
                                             "output_type": task.OUTPUT_TYPE} for name, task in sorted(tasks.items())}}}
