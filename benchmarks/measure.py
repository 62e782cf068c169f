"""Measuring on a noisy machine: interleaved repetitions in one process, ratios per repetition, peak RSS."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRss:
    """The highest resident set seen while the block runs (sampled every 5 ms by a thread)."""

    def __enter__(self):
        self.peak = rss_mib()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)

    def __exit__(self, *_):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def interleaved(variants: dict[str, Callable[[], object]], repetitions: int, warmup: bool = True) -> dict[str, list]:
    """Seconds per repetition of each variant, run in turn (A B A B ...) so drift hits all alike."""
    if warmup:
        for run in variants.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repetitions):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """median/min/max of the per-repetition ratios."""
    return spread([a / b for a, b in zip(numerator, denominator, strict=True)])
