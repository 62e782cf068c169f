"""The judge: a rubric asked of a backend, its on-disk verdict cache, and summaries of its verdicts.

An answer that does not parse is asked again once with a stricter reminder; if it still does not parse, the
verdict is empty (refused and score None), counted in `judge_parse_failures` and left out of every mean.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cna.evaluation.intervals import bootstrap_interval, wilson_interval
from cna.evaluation.judges.backends import Backend
from cna.evaluation.judges.rubrics import Rubric, Verdict, YesNoRubric
from cna.io import write_text_atomic


def verdict_key(judge_identity: str, rubric_version: str, prompt: str, response: str) -> str:
    fields = [judge_identity, rubric_version, prompt, response]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


class VerdictCache:
    """One small JSON file per verdict under `folder`, written atomically: parallel jobs may share the folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.hits = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Verdict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        self.hits += 1
        return Verdict(**json.loads(path.read_text(encoding="utf-8")))

    def put(self, key: str, verdict: Verdict) -> None:
        write_text_atomic(self._path(key), json.dumps(asdict(verdict), ensure_ascii=False))


class Judge:
    """A rubric asked of a backend, with the verdict cache and one stricter retry for unreadable answers."""

    def __init__(self, rubric: Rubric, backend: Backend, *, max_new_tokens: int = 40,
                 max_response_chars: int = 1200, cache: VerdictCache | None = None):
        self.rubric, self.backend, self.cache = rubric, backend, cache
        self.max_new_tokens, self.max_response_chars = max_new_tokens, max_response_chars
        self.questions_asked = 0  # questions sent to the backend, retries included
        self.retried = 0  # questions asked again with the reminder

    def key(self, prompt: str, response: str) -> str:
        """The verdict cache's key of one pair for this judge."""
        return verdict_key(f"{self.backend.identity}|{self.max_response_chars}", self.rubric.version, prompt,
                           response)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        if len(prompts) != len(responses):
            raise ValueError(f"need one response per prompt, got {len(prompts)} and {len(responses)}")
        keys = [self.key(p, r) for p, r in zip(prompts, responses, strict=True)]
        verdicts: list[Verdict | None] = [self.cache.get(k) if self.cache else None for k in keys]
        missing = [i for i, v in enumerate(verdicts) if v is None]
        if missing:
            questions = [self.rubric.question(prompts[i], responses[i][: self.max_response_chars]) for i in missing]
            for i, verdict in zip(missing, self._judge(questions), strict=True):
                verdicts[i] = verdict
                if self.cache and verdict.parsed:  # an unreadable answer is asked again next time
                    self.cache.put(keys[i], verdict)
        return verdicts  # type: ignore[return-value]

    def _judge(self, questions: list[str]) -> list[Verdict]:
        if isinstance(self.rubric, YesNoRubric) and hasattr(self.backend, "yes_probability"):
            self.questions_asked += len(questions)
            return [YesNoRubric.from_probability(p) for p in self.backend.yes_probability(questions)]
        answers = self._ask(questions)
        verdicts = [self.rubric.parse(a) for a in answers]
        again = [i for i, v in enumerate(verdicts) if v is None]
        if again:
            self.retried += len(again)
            retried = self._ask([questions[i] + self.rubric.reminder for i in again])
            for i, answer in zip(again, retried, strict=True):
                verdicts[i] = self.rubric.parse(answer) or Verdict(None, None, {}, answer)
        return verdicts  # type: ignore[return-value]

    def _ask(self, questions: list[str]) -> list[str]:
        self.questions_asked += len(questions)
        return self.backend.complete(questions, self.max_new_tokens)


def judge_summary(verdicts: Sequence[Verdict], *, seed: int = 0) -> dict:
    """Refusal rate (Wilson 95%) and mean score (bootstrap 95%) over the readable verdicts; the rest are counted."""
    readable = [v for v in verdicts if v.parsed]
    refused = sum(bool(v.refused) for v in readable)
    scores = [v.score for v in readable]
    return {
        "judge_refusal_rate": refused / len(readable) if readable else None,
        "judge_refusal_ci95": list(wilson_interval(refused, len(readable))) if readable else None,
        "judge_score": sum(scores) / len(scores) if scores else None,
        "judge_score_ci95": list(bootstrap_interval(scores, seed=seed)) if scores else None,
        "judge_parse_failures": len(verdicts) - len(readable),
        "judge_n": len(readable),
    }


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Agreement beyond chance of two raters over any labels (True/False, or classes such as the three compliance
    verdicts); None where it is undefined (both raters give one and the same label throughout)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    counts_a, counts_b = Counter(a), Counter(b)
    chance = sum(counts_a[label] * counts_b[label] for label in counts_a) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def kappa_interval(a: Sequence[Hashable], b: Sequence[Hashable], *, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Cohen's kappa over the rated items (resampled in pairs, seeded); resamples
    where kappa is undefined are left out. None where it is undefined on the items themselves."""
    if cohen_kappa(a, b) is None:
        return None
    rng = np.random.default_rng(seed)
    pairs = list(zip(a, b, strict=True))
    values = []
    for _ in range(resamples):
        drawn = [pairs[i] for i in rng.integers(0, len(pairs), size=len(pairs))]
        kappa = cohen_kappa([x for x, _ in drawn], [y for _, y in drawn])
        if kappa is not None:
            values.append(kappa)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
