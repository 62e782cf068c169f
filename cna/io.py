"""Files written whole or not at all, and JSON read back with one-line errors: the base every artifact uses.

Every writer leaves the old file or the new one on disk, never half of one, so a job killed at any moment
can be resumed and parallel readers never see a partial file. This module imports nothing of cna but its
error type.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cna.errors import CnaError


def save_atomically(path: str | Path, save: Callable[[Path], object]) -> Path:
    """Call `save(temporary)` beside `path`, then rename: parallel jobs and readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file so that a killed process leaves the old file or the new one, never half of one."""
    return save_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON so that a killed process leaves the old file or the new one, never half of one."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; a missing, broken or non-UTF-8 file is one line naming it (CnaError)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CnaError(f"'{path}' does not exist") from error
    except UnicodeDecodeError as error:
        raise CnaError(f"'{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                       f"{error.start})") from error
    except json.JSONDecodeError as error:
        raise CnaError(f"'{path}' is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
                       ) from error
    if not isinstance(data, dict):
        raise CnaError(f"'{path}' holds a JSON {type(data).__name__}; expected an object")
    return data
