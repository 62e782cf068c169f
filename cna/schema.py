"""Config dataclasses declare what each setting accepts; `check_settings` enforces it with one-line errors.

Hydra checks every key and type as it composes (cna.config registers the dataclasses as its schemas); the
allowed values of a setting (a choice among names, a number range) sit beside its field as metadata, so the
schema is the one place that says what a setting accepts, and the message names the setting's full path:
`method.sign: expected one of abs, positive, negative, got 'up'`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from cna.errors import ConfigError


def choice(default: Any, choices: Sequence[Any]) -> Any:
    """A field that accepts one of `choices`."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def bounded(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            integer: bool = False) -> Any:
    """A number field within [low, high] ((low, high] with `low_open`); None passes where the type allows it."""
    return dataclasses.field(default=default, metadata={"range": (low, high, low_open, integer)})


def _describe_range(low, high, low_open: bool, integer: bool) -> str:
    kind = "an integer" if integer else "a number"
    if high is None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}]"


def _in_range(value, low, high, low_open: bool, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        return False
    above = low is None or (value > low if low_open else value >= low)
    return above and (high is None or value <= high)


def shown(value: Any) -> str:
    """A value as the user wrote it: a typed float 2.0 came from `2`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def check_settings(settings: Any, path: str = "", *, skip: tuple[str, ...] = ()) -> None:
    """Raise ConfigError on the first field of `settings` (a config dataclass, nested ones and dicts of them
    included) whose value its metadata does not accept; `path` is its place in the job config ("" at the top),
    `skip` names fields that are checked elsewhere."""
    if isinstance(settings, Mapping):
        for key, value in settings.items():
            check_settings(value, f"{path}.{key}" if path else str(key))
        return
    if not dataclasses.is_dataclass(settings):
        return
    for spec in dataclasses.fields(settings):
        if spec.name in skip:
            continue
        value, key = getattr(settings, spec.name), f"{path}.{spec.name}" if path else spec.name
        if "choices" in spec.metadata and value not in spec.metadata["choices"]:
            choices = ", ".join("null" if c is None else str(c) for c in spec.metadata["choices"])
            raise ConfigError(f"{key}: expected one of {choices}, got {shown(value)}")
        if "range" in spec.metadata and value is not None and not _in_range(value, *spec.metadata["range"]):
            raise ConfigError(f"{key}: expected {_describe_range(*spec.metadata['range'])}, got {shown(value)}")
        check_settings(value, key)
