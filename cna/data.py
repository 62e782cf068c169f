"""Prompt sets: read from local files, shipped with the package, and encoded for a model."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from cna.errors import ConfigError

TEMPLATES = ("chat", "raw")


def read_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a CSV, JSON (a list of rows or of strings), JSONL or text file (one prompt per line).

    `column` picks a field of CSV/JSON rows, matched case-insensitively.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise ConfigError(f"prompt file '{path}' has suffix '{suffix}'; expected .csv, .json, .jsonl or .txt")
    if rows and all(isinstance(row, str) for row in rows):
        return list(rows)
    return [str(row[_find_column(row, column, path)]) for row in rows]


def _find_column(row: dict, column: str | None, path: Path) -> str:
    if column is None:
        raise ConfigError(f"prompt file '{path}' has columns {list(row)}; name one with `column`")
    for key in row:
        if key.lower() == column.lower():
            return key
    raise ConfigError(f"prompt file '{path}' has no column '{column}'; it has {list(row)}")


def packaged_prompts(name: str) -> list[str]:
    """A prompt set shipped with cna (cna/prompt_sets/<name>.txt)."""
    resource = resources.files("cna") / "prompt_sets" / f"{name}.txt"
    if not resource.is_file():
        raise ConfigError(f"no packaged prompt set '{name}'")
    return [line.strip() for line in resource.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_prompts(tokenizer, prompts: Sequence[str], template: str = "chat") -> list[list[int]]:
    """Token ids per prompt: as a user turn of the model's chat template, or the raw text for base models."""
    if template not in TEMPLATES:
        raise ConfigError(f"prompt template '{template}' is not one of {TEMPLATES}")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template; use template 'raw' for base models")
        encoded = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            for prompt in prompts
        ]
        # transformers 5 returns a BatchEncoding here, 4.x a plain list of ids.
        return [list(ids if isinstance(ids, list) else ids["input_ids"]) for ids in encoded]
    return [list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) for prompt in prompts]


def prompt_sets_sha256(*prompt_sets: Sequence[str]) -> str:
    """A fingerprint of prompt sets, order and boundaries included."""
    digest = hashlib.sha256()
    for prompts in prompt_sets:
        digest.update(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()
