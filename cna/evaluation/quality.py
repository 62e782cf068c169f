"""Output quality: 1 - the fraction of repeated word n-grams (paper section 4).

A response made of distinct n-grams scores 1; one that loops scores near 0.
An empty response, or one shorter than n words, has no n-gram to judge: it is
*degenerate*, scores 0 and counts in `degenerate_rate`; it never scores as perfect.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cna.evaluation.intervals import bootstrap_interval

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def response_quality(text: str, n: int = 3) -> float | None:
    """1 - repeated n-grams / all n-grams; None when the response is degenerate (fewer than n words)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = words(text)
    if len(tokens) < n:
        return None
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams)


@dataclass(frozen=True)
class QualitySummary:
    mean: float  # degenerate responses count as 0
    ci95: tuple[float, float]
    degenerate_rate: float
    scores: list[float]


def quality_summary(texts: Sequence[str], n: int = 3, seed: int = 0) -> QualitySummary:
    raw = [response_quality(text, n) for text in texts]
    scores = [0.0 if score is None else score for score in raw]
    return QualitySummary(
        mean=sum(scores) / len(scores),
        ci95=bootstrap_interval(scores, seed=seed),
        degenerate_rate=sum(score is None for score in raw) / len(raw),
        scores=scores,
    )
