"""On-disk cache of discovery statistics, so a sweep over k, sign or filter threshold runs its forward passes once.

The key covers everything the statistics depend on: the model (where it was loaded
from, revision, dtype, quantisation settings, attention implementation, device type:
`cna.models.activation_identity`), its family's neuron site, the exact token ids of the prompt
set (so template and tokenizer changes miss), the token-position policy and the
universal filter's top fraction.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cna.discovery import ActivationStatistics


def statistics_key(*, model: dict, site: str, prompts: Sequence[Sequence[int]], position: str,
                   top_fraction: float | None) -> str:
    tokens = hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()
    fields = {"model": model, "site": site, "tokens": tokens, "position": position, "top_fraction": top_fraction}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class StatisticsCache:
    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], ActivationStatistics]) -> ActivationStatistics:
        if self.folder is None:
            self.misses += 1
            return compute()
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            self.hits += 1
            return ActivationStatistics.load(path)
        self.misses += 1
        statistics = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written beside its final name and renamed: parallel jobs never read half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        try:
            statistics.save(temporary)
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        return statistics
