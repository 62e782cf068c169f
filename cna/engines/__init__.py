"""Engines as plug-ins: what generates text and scores next tokens for the evaluation, found by `engine.name`.

Built in: `hf` (transformers, cna's own batched and refilled loop; the default) and `vllm` (vLLM's offline `LLM`,
`pip install 'cna[vllm]'`). Discovery always runs on transformers; an engine serves the strength sweep: it
generates the metrics' responses, scores MMLU's and KL's next tokens, and steers at each point. A new engine is
an `Engine` subclass decorated with `register_engine`, a config dataclass (its `config_type`, registered as the
Hydra schema `engine/_<name>_schema` by cna.config) and conf/engine/<name>.yaml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cna.plugins import import_package

if TYPE_CHECKING:
    from cna.engines.base import Engine

_REGISTRY: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine known by its `name` (a later class of the same name replaces it)."""
    _REGISTRY[cls.name] = cls
    return cls


def engine_types() -> dict[str, type[Engine]]:
    """Every registered engine by name; the modules of cna.engines register theirs on import (vLLM itself is
    imported only when a vllm engine starts)."""
    import_package("cna.engines")
    return dict(sorted(_REGISTRY.items()))
