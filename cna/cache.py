"""On-disk caches: what a sweep would otherwise compute again for every job.

- `StatisticsCache`: discovery statistics, so a sweep over k, sign or filter threshold runs its forward
  passes once. The key covers everything the statistics depend on: the model (where it was loaded from,
  revision, dtype, quantisation settings, attention implementation, device type:
  `cna.models.activation_identity`), its family's neuron site, the exact token ids of the prompt set (so
  template and tokenizer changes miss), the token-position policy and the universal filter's top fraction;
  gradient statistics (`cna.attribution`) also key on their score and metric, activation statistics on none.
- `BaselineCache`: the unsteered evaluation point (alpha = 0, m = 1) with its generation records, and the
  unsteered log-probabilities KL is measured against. They depend on the model and the evaluation, never on
  the recipe, so a multirun of N recipes computes them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cna.discovery import ActivationStatistics
from cna.io import save_atomically, write_json_atomic

log = logging.getLogger(__name__)


def statistics_key(*, model: dict, site: str, prompts: Sequence[Sequence[int]], position: str,
                   top_fraction: float | None, score: dict | None = None, prompt_format: dict | None = None) -> str:
    """`score`: the gradient score and its metric; None (activation statistics, any score) keeps the old keys.
    `prompt_format`: a system prompt and chat-template arguments (the token ids change with them already; the key
    names them too); None where neither is set keeps the old keys."""
    tokens = hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()
    fields = {"model": model, "site": site, "tokens": tokens, "position": position, "top_fraction": top_fraction}
    if score is not None:
        fields["score"] = score
    if prompt_format is not None:
        fields["prompt_format"] = prompt_format
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class StatisticsCache:
    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], ActivationStatistics],
                       load: Callable[[Path], ActivationStatistics] = ActivationStatistics.load):
        """`load` reads a saved value back (GradientStatistics.load for gradient statistics)."""
        if self.folder is None:
            self.misses += 1
            return compute()
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            try:
                statistics = load(path)
                self.hits += 1
                return statistics
            except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a truncated file
                log.warning("statistics cache file %s is unreadable (%s): computing it again", path, error)
        self.misses += 1
        statistics = compute()
        save_atomically(path, statistics.save)  # replaces an unreadable file in one rename
        return statistics


class BaselineCache:
    """Unsteered points as JSON files `<key>.json` holding {"point": ..., "records": [...]}."""

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder).expanduser()

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.json"

    def get(self, key: str) -> tuple[dict, list[dict]] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return saved["point"], saved["records"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: computed again and replaced

    def put(self, key: str, point: dict, records: list[dict]) -> None:
        path = self._path(key)
        if path is not None:
            write_json_atomic(path, {"point": point, "records": records})

    def tensor(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """An unsteered tensor (the KL reference log-probabilities), from `<key>.safetensors` or computed and saved."""
        if self.folder is None:
            return compute()
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["value"]
            except Exception as error:  # noqa: BLE001 - a truncated or foreign file is computed again and replaced
                log.warning("baseline cache file %s is unreadable (%s): computing it again", path, error)
        value = compute()
        save_atomically(path, lambda temporary: save_file({"value": value.contiguous()}, str(temporary)))
        return value
