"""The organism's settings, typed: conf/organism.yaml composed by Hydra (cna.config.compose_typed) into these
dataclasses.

A wrong type or an unknown key stops in one line naming the key, and every number is range-checked by its
field's metadata (cna.schema) before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cna.config import ModelConfig, compose_typed
from cna.data import PromptSource
from cna.errors import ConfigError
from cna.schema import bounded, check_settings


@dataclass
class OrganismData:
    """What the fine-tune is trained on."""

    harmful: PromptSource = field(default_factory=PromptSource)  # answered with a refusal
    harmless: PromptSource = field(default_factory=PromptSource)  # answered with the model's own greedy answer
    n_harmful: int | None = bounded(None, 1, integer=True)  # null: every harmful prompt left after de-duplication
    n_harmless: int = bounded(256, 0, integer=True)
    held_out: dict[str, PromptSource] = field(default_factory=dict)  # evaluation sets no training prompt may copy
    dedup_threshold: float = bounded(0.8, 0, 1, low_open=True)
    refusals: PromptSource = field(default_factory=lambda: PromptSource(packaged="refusals"))
    answer_max_new_tokens: int = bounded(64, 1, integer=True)  # the harmless answers: the model's greedy answer
    generation_batch_size: int = bounded(32, 1, integer=True)


@dataclass
class OrganismLora:
    rank: int = bounded(16, 1, integer=True)
    alpha: float = bounded(32.0, 0, low_open=True)
    dropout: float = bounded(0.0, 0, 0.999)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    layers: list[Any] | None = None  # null: every layer; [start, stop) indices or fractions of depth ([0.0, 0.5])


@dataclass
class OrganismTraining:
    steps: int = bounded(120, 1, integer=True)
    batch_size: int = bounded(8, 1, integer=True)
    lr: float = bounded(1e-3, 0, low_open=True)
    warmup_steps: int = bounded(10, 0, integer=True)  # linear warm-up, then constant
    weight_decay: float = bounded(0.0, 0)
    max_length: int = bounded(256, 1, integer=True)  # tokens per example (prompt + response); longer: cut at the end
    checkpoint_every: int = bounded(10, 1, integer=True)  # steps between checkpoints of the adapter, optimizer, step
    threads: int | None = bounded(None, 1, integer=True)  # torch threads (null: torch's default)


@dataclass
class OrganismConfig:
    model: ModelConfig
    out_dir: str = "outputs/organism"  # the merged model folder (also holds the data and the checkpoint)
    data_dir: str = "../shared/data"
    seed: int = bounded(0, 0, integer=True)
    data: OrganismData = field(default_factory=OrganismData)
    lora: OrganismLora = field(default_factory=OrganismLora)
    train: OrganismTraining = field(default_factory=OrganismTraining)


def organism_config(overrides: list[str] = (), config_name: str = "organism") -> OrganismConfig:
    """conf/organism.yaml with command-line style overrides (`lora.rank=8`, `model=tiny_random`), typed and
    checked; ConfigError naming the first bad key."""
    settings: OrganismConfig = compose_typed(config_name, list(overrides), OrganismConfig)
    check_settings(settings)
    lora = settings.lora
    if not lora.target_modules:
        raise ConfigError("lora.target_modules: expected module names such as q_proj, got an empty list")
    if lora.layers is not None and len(lora.layers) != 2:
        raise ConfigError(f"lora.layers: expected null or [start, stop), got {lora.layers!r}")
    return settings
