"""MMLU (Hendrycks et al. 2021): the standard prompt, 0- or k-shot, scored by the next-token
log-probabilities of " A", " B", " C", " D" after "Answer:", batched; and the `mmlu` metric (`eval.mmlu`).
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cna.errors import ConfigError
from cna.evaluation.intervals import wilson_interval
from cna.evaluation.metric import DataContext, Field, Metric, register_metric
from cna.evaluation.scoring import next_token_logprobs
from cna.prefix import LayerPrefixReuse
from cna.schema import bounded

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MmluQuestion:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0-3


def load_mmlu_folder(folder: str | Path, split: str = "test") -> list[MmluQuestion]:
    """Questions from per-subject CSVs `<folder>/<split>/<subject>_<split>.csv` (question, choice0-3, answer)."""
    directory = Path(folder).expanduser() / split
    files = sorted(directory.glob(f"*_{split}.csv"))
    if not files:
        raise ConfigError(f"MMLU folder '{directory}' has no *_{split}.csv files")
    questions = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                questions.append(MmluQuestion(subject, row["question"],
                                              tuple(row[f"choice{i}"] for i in range(4)), int(row["answer"])))
    return questions


def stratified_sample(questions: Sequence[MmluQuestion], n: int, seed: int = 0) -> list[MmluQuestion]:
    """n questions, each subject getting its share of the total (largest remainders), drawn with `seed`."""
    if n > len(questions):
        raise ConfigError(f"MMLU sample of {n} asked for, but only {len(questions)} questions exist")
    by_subject: dict[str, list[MmluQuestion]] = defaultdict(list)
    for question in questions:
        by_subject[question.subject].append(question)
    quotas = {s: n * len(qs) / len(questions) for s, qs in by_subject.items()}
    counts = {s: int(q) for s, q in quotas.items()}
    leftover = n - sum(counts.values())
    for subject in sorted(quotas, key=lambda s: (counts[s] - quotas[s], s))[:leftover]:
        counts[subject] += 1
    rng = random.Random(seed)
    return [q for s in sorted(by_subject) for q in rng.sample(by_subject[s], counts[s])]


def _block(question: MmluQuestion, answer: bool) -> str:
    lines = [question.question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True)]
    lines.append(f"Answer: {LETTERS[question.answer]}" if answer else "Answer:")
    return "\n".join(lines)


def mmlu_prompt(question: MmluQuestion, shots: Sequence[MmluQuestion] = ()) -> str:
    subject = question.subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return header + "".join(_block(shot, True) + "\n\n" for shot in shots) + _block(question, False)


def letter_token_ids(tokenizer) -> list[int]:
    """The single token of " A" ... " D" that follows "Answer:"."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ConfigError(f"the tokenizer splits ' {letter}' into {len(encoded)} tokens; MMLU scoring needs one")
        ids.append(encoded[0])
    return ids


@dataclass(frozen=True)
class MmluResult:
    accuracy: float
    ci95: tuple[float, float]
    n: int
    k_shot: int
    predictions: list[int]
    per_subject: dict[str, float]


def evaluate_mmlu(
    model,
    tokenizer,
    questions: Sequence[MmluQuestion],
    *,
    dev: Sequence[MmluQuestion] = (),
    k_shot: int = 0,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    progress: bool = True,
    reuse: LayerPrefixReuse | None = None,
    score: Callable[[list[list[int]], list[int]], torch.Tensor] | None = None,
) -> MmluResult:
    """Accuracy of the arg-max letter; k-shot examples are the first k dev questions of the same subject.

    `score(prompts, token_ids)` gives the letters' log-probabilities (an engine's, cna.engines); default: `model`'s
    batched forward."""
    dev_by_subject: dict[str, list[MmluQuestion]] = defaultdict(list)
    for question in dev:
        dev_by_subject[question.subject].append(question)
    if k_shot and any(len(dev_by_subject[q.subject]) < k_shot for q in questions):
        raise ConfigError(f"k_shot={k_shot} needs {k_shot} dev questions for every subject asked")
    texts = [mmlu_prompt(q, dev_by_subject[q.subject][:k_shot]) for q in questions]
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    if score is None:
        logprobs = next_token_logprobs(model, encoded, pad_token_id=tokenizer.pad_token_id,
                                       token_ids=letter_token_ids(tokenizer), batch_size=batch_size,
                                       max_batch_tokens=max_batch_tokens, progress=progress,
                                       desc="mmlu", reuse=reuse)
    else:
        logprobs = score(encoded, letter_token_ids(tokenizer))
    predictions = logprobs.argmax(-1).tolist()
    correct = [p == q.answer for p, q in zip(predictions, questions, strict=True)]
    per_subject: dict[str, list[bool]] = defaultdict(list)
    for question, right in zip(questions, correct, strict=True):
        per_subject[question.subject].append(right)
    return MmluResult(
        accuracy=sum(correct) / len(correct),
        ci95=wilson_interval(sum(correct), len(correct)),
        n=len(correct),
        k_shot=k_shot,
        predictions=predictions,
        per_subject={s: sum(v) / len(v) for s, v in sorted(per_subject.items())},
    )


@dataclass
class MmluConfig:
    """`eval.mmlu`: a stratified sample of MMLU's test questions (n: 0 switches it off)."""

    folder: str | None = None  # per-subject CSVs: <folder>/test/*_test.csv and <folder>/dev/*_dev.csv
    n: int = bounded(1000, 0, integer=True)
    k_shot: int = bounded(0, 0, integer=True)  # examples from the dev split of the same subject


@register_metric
class Mmlu(Metric):
    """MMLU accuracy under the intervention: what steering costs in general capability."""

    name = "mmlu"
    config_type = MmluConfig
    order = 50
    fields = (Field("mmlu_accuracy", "MMLU", "mmlu_ci95",
                    about="Multiple-choice accuracy under the same intervention (chance is 0.25)."),)

    def __init__(self, questions: Sequence[MmluQuestion], *, k_shot: int = 0, dev: Sequence[MmluQuestion] = ()):
        self.questions, self.k_shot, self.dev = list(questions), k_shot, list(dev)

    @classmethod
    def from_config(cls, config: MmluConfig, data: DataContext) -> Mmlu | None:
        if not config.n:
            return None
        if not config.folder:
            raise ConfigError("eval.mmlu.folder: expected the MMLU folder (test/ and dev/ CSVs), got null")
        questions = stratified_sample(load_mmlu_folder(config.folder, "test"), config.n, data.seed)
        dev = load_mmlu_folder(config.folder, "dev") if config.k_shot else []
        return cls(questions, k_shot=config.k_shot, dev=dev)

    def identity(self) -> dict:
        return {"questions": [asdict(question) for question in self.questions], "k_shot": self.k_shot}

    def measure(self, point: PointContext) -> dict:
        session = point.session
        result = evaluate_mmlu(session.model, session.tokenizer, self.questions, dev=self.dev, k_shot=self.k_shot,
                               score=lambda prompts, letters: session.next_token_logprobs(prompts, "mmlu", letters))
        return {"mmlu_accuracy": result.accuracy, "mmlu_ci95": list(result.ci95)}
