"""Prompt sets: read from local files, shipped with the package, and encoded for a model."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from importlib import resources
from pathlib import Path

from cna.errors import CnaError, ConfigError

TEMPLATES = ("chat", "raw")


def read_prompt_file(path: str | Path, column: str | None = None, where: dict | None = None) -> list[str]:
    """Prompts from a CSV, JSON (a list of rows or of strings), JSONL or text file (one prompt per line).

    `column` picks a field of CSV/JSON rows, matched case-insensitively; `where` keeps only
    the rows whose fields equal the given values (e.g. {"label": "safe"} for XSTest).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl", ".json"):
        raise ConfigError(f"prompt file '{path}' has suffix '{suffix}'; expected .csv, .json, .jsonl or .txt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"prompt file '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                          f"offset {error.start})") from error
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        documents = list(enumerate(text.splitlines(), 1)) if suffix == ".jsonl" else [(1, text)]
        parsed = []
        for first_line, document in documents:
            if not document.strip():
                continue
            try:
                parsed.append(json.loads(document))
            except json.JSONDecodeError as error:
                raise ConfigError(f"prompt file '{path}' is not valid {suffix[1:].upper()} ({error.msg} at line "
                                  f"{first_line + error.lineno - 1}, column {error.colno})") from error
        rows = parsed if suffix == ".jsonl" else (parsed[0] if parsed else [])
    if not isinstance(rows, list):
        raise ConfigError(f"prompt file '{path}' holds a JSON {type(rows).__name__}; expected a list of rows or "
                          "of strings")
    if rows and all(isinstance(row, str) for row in rows):
        if where:
            raise ConfigError(f"prompt file '{path}' has no fields to filter with `where`")
        return list(rows)
    return _select(rows, column, where, path)


def _select(rows: list[dict], column: str | None, where: dict | None, origin) -> list[str]:
    """The `column` of the rows whose fields equal `where`'s values; names match in any case. A prompt must be
    text: a number, a null or a nested value in the column is one line naming its row."""
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ConfigError(f"prompt file '{origin}': row {number} is a {type(row).__name__}, not an object with "
                              "named fields (or give every row as a string)")
    numbered = list(enumerate(rows, 1))
    for key, value in (where or {}).items():
        numbered = [(n, row) for n, row in numbered if str(row[_find_column(row, key, origin)]) == str(value)]
    prompts = []
    for number, row in numbered:
        value = row[_find_column(row, column, origin)]
        if not isinstance(value, str):
            raise ConfigError(f"prompt file '{origin}': row {number}'s '{column}' is {json.dumps(value)}, not text")
        prompts.append(value)
    return prompts


def _find_column(row: dict, column: str | None, origin) -> str:
    if column is None:
        raise ConfigError(f"'{origin}' has columns {list(row)}; name one with `column`")
    for key in row:
        if key.lower() == column.lower():
            return key
    raise ConfigError(f"'{origin}' has no column '{column}'; it has {list(row)}")


def packaged_prompts(name: str, subset: str | None = None) -> list[str]:
    """A prompt set shipped with cna: `<name>.txt` (one per line) or `<name>.jsonl` rows with a `set` field.

    For JSONL sets, `subset` picks the rows of one set ("positive" or "negative").
    """
    return [row["prompt"] for row in packaged_rows(name, subset)]


def packaged_rows(name: str, subset: str | None = None) -> list[dict]:
    """Rows of a packaged set: {"prompt"} for text sets; {"prompt", "target"?, "set"} for JSONL sets."""
    folder = resources.files("cna") / "prompt_sets"
    text, table = folder / f"{name}.txt", folder / f"{name}.jsonl"
    if text.is_file():
        if subset is not None:
            raise ConfigError(f"packaged prompt set '{name}' has no subsets; got subset '{subset}'")
        return [{"prompt": line.strip()} for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not table.is_file():
        known = sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".txt", ".jsonl")))
        raise ConfigError(f"no packaged prompt set '{name}'; known: {', '.join(known)}")
    rows = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
    if subset is None:
        return rows
    chosen = [row for row in rows if row["set"] == subset]
    if not chosen:
        raise ConfigError(f"packaged prompt set '{name}' has no subset '{subset}'; it has "
                          f"{sorted({row['set'] for row in rows})}")
    return chosen


@dataclass
class PromptSource:
    """Where a prompt set comes from: a local file (tried first, when it exists), the hub, or the package."""

    path: str | None = None  # CSV / JSON / JSONL / TXT
    column: str | None = None  # the field holding the prompt, any case
    hub: str | None = None  # a dataset name on the Hugging Face hub
    config: str | None = None
    split: str = "train"
    packaged: str | None = None  # a set shipped with cna
    subset: str | None = None  # for packaged sets: "positive" or "negative"
    where: dict | None = None  # keep only rows whose fields equal these values


def load_prompts(source: PromptSource) -> list[str]:
    if source.packaged:
        return packaged_prompts(source.packaged, source.subset)
    if source.path and (Path(source.path).expanduser().is_file() or not source.hub):
        return read_prompt_file(source.path, source.column, source.where)
    if source.hub:
        return _hub_prompts(source)
    raise ConfigError("a prompt source needs one of path, hub or packaged")


def _hub_prompts(source: PromptSource) -> list[str]:
    from datasets import load_dataset

    try:
        rows = load_dataset(source.hub, source.config, split=source.split)
    except Exception as error:  # the hub raises many types; all mean "not available here"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        missing = f"the file '{source.path}' does not exist and " if source.path else ""
        raise CnaError(f"{missing}cannot load dataset '{source.hub}' from the hub ({first_line}); "
                       "set its `path` to a local file") from error
    return _select(rows.to_list(), source.column, source.where, source.hub)


def subsample(prompts: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """n prompts drawn without replacement with `seed` (all of them, in order, when n is None)."""
    if n is None:
        return list(prompts)
    if not 1 <= n <= len(prompts):
        raise ConfigError(f"asked for {n} prompts, but the set has {len(prompts)}")
    return random.Random(seed).sample(list(prompts), n)


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what an exact duplicate is compared on."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def similarity(a: str, b: str) -> float:
    """Character-level similarity of two normalised texts in [0, 1] (difflib's ratio)."""
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass
class Deduplication:
    kept: list[str]
    exact: list[str]  # dropped: equal to an evaluation prompt after normalising
    near: list[tuple[str, str, float]]  # dropped: (prompt, the evaluation prompt it resembles, similarity)

    @property
    def removed(self) -> int:
        return len(self.exact) + len(self.near)


def deduplicate(candidates: Sequence[str], evaluation: Sequence[str], threshold: float = 0.8) -> Deduplication:
    """Drop discovery prompts that are exact or near duplicates (similarity >= threshold) of evaluation prompts.

    Pairs sharing under a quarter of their words are skipped before the character comparison,
    which keeps an 18,000 x 100 check to seconds; every job of a sweep in one process asks the same
    question, so the answer is remembered.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"dedup threshold must be in (0, 1], got {threshold}")
    found = _deduplicate(tuple(candidates), tuple(evaluation), threshold)
    return Deduplication(list(found.kept), list(found.exact), list(found.near))


@functools.lru_cache(maxsize=16)
def _deduplicate(candidates: tuple[str, ...], evaluation: tuple[str, ...], threshold: float) -> Deduplication:
    targets = [(normalise(text), text) for text in evaluation]
    target_words = [set(norm.split()) for norm, _ in targets]
    exact_set = {norm for norm, _ in targets}
    result = Deduplication([], [], [])
    for text in candidates:
        norm = normalise(text)
        if norm in exact_set:
            result.exact.append(text)
            continue
        words = set(norm.split())
        best = (0.0, "")
        for (target_norm, target), target_set in zip(targets, target_words, strict=True):
            union = len(words | target_set)
            if union and len(words & target_set) / union >= 0.25:
                best = max(best, (similarity(norm, target_norm), target))
        if best[0] >= threshold:
            result.near.append((text, best[1], best[0]))
        else:
            result.kept.append(text)
    return result


def encode_prompts(tokenizer, prompts: Sequence[str], template: str = "chat", *, system_prompt: str | None = None,
                   template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids per prompt: as a user turn of the model's chat template, or the raw text for base models.

    `system_prompt` opens the conversation with a system turn; `template_kwargs` go to the chat template (e.g.
    {"enable_thinking": False} for Qwen3). Both need the chat template.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"prompt template '{template}' is not one of {TEMPLATES}")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template; use template 'raw' for base models")
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        try:
            encoded = [
                tokenizer.apply_chat_template(system + [{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=True, **(template_kwargs or {}))
                for prompt in prompts
            ]
        except Exception as error:  # noqa: BLE001 - jinja's TemplateError and the template's own raise_exception
            if system_prompt is None and not template_kwargs:
                raise
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            key = "model.system_prompt" if system_prompt is not None else "model.chat_template_kwargs"
            raise ConfigError(f"{key}: the model's chat template rejects it ({first})") from error
        # transformers 5 returns a BatchEncoding here, 4.x a plain list of ids.
        return [list(ids if isinstance(ids, list) else ids["input_ids"]) for ids in encoded]
    if system_prompt is not None or template_kwargs:
        raise ConfigError("model.system_prompt and model.chat_template_kwargs need model.template=chat")
    return [list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) for prompt in prompts]


def prompt_sets_sha256(*prompt_sets: Sequence[str]) -> str:
    """A fingerprint of prompt sets, order and boundaries included."""
    digest = hashlib.sha256()
    for prompts in prompt_sets:
        digest.update(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()
