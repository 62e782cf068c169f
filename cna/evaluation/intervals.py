"""Confidence intervals for the rates and means every evaluator reports."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate: sound at 0 and at n, unlike the normal approximation."""
    if n <= 0:
        raise ValueError("a rate over zero trials has no interval")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean, seeded."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("a mean over no values has no interval")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def difference_interval(before: float, before_ci: Sequence[float], after: float,
                        after_ci: Sequence[float]) -> tuple[float, float]:
    """95% interval of after - before for two rates, from their Wilson intervals (Newcombe's hybrid score method).

    It treats the two rates as independent samples, which is conservative when they share prompts.
    """
    low = (after - before) - math.sqrt((after - after_ci[0]) ** 2 + (before_ci[1] - before) ** 2)
    high = (after - before) + math.sqrt((after_ci[1] - after) ** 2 + (before - before_ci[0]) ** 2)
    return (max(-1.0, low), min(1.0, high))
