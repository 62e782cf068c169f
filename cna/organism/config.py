"""The organism's settings, typed: conf/organism.yaml composed by Hydra, checked against these dataclasses.

A wrong type or an unknown key stops in one line naming the key (OmegaConf's structured-config check), and the
numbers are range-checked here before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cna.config import ModelConfig
from cna.data import PromptSource
from cna.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class OrganismData:
    """What the fine-tune is trained on."""

    harmful: PromptSource = field(default_factory=PromptSource)  # answered with a refusal
    harmless: PromptSource = field(default_factory=PromptSource)  # answered with the model's own greedy answer
    n_harmful: int | None = None  # null: every harmful prompt left after de-duplication
    n_harmless: int = 256
    held_out: dict[str, PromptSource] = field(default_factory=dict)  # evaluation sets no training prompt may copy
    dedup_threshold: float = 0.8
    refusals: PromptSource = field(default_factory=lambda: PromptSource(packaged="refusals"))
    answer_max_new_tokens: int = 64  # the harmless answers: the model's greedy continuation, at most this long
    generation_batch_size: int = 32


@dataclass
class OrganismLora:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    layers: list[Any] | None = None  # null: every layer; [start, stop) indices or fractions of depth ([0.0, 0.5])


@dataclass
class OrganismTraining:
    steps: int = 120
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10  # linear warm-up, then constant
    weight_decay: float = 0.0
    max_length: int = 256  # tokens per example (prompt + response); longer ones are cut from the end
    checkpoint_every: int = 10  # steps between checkpoints of the adapter, optimizer and step
    threads: int | None = None  # torch threads (null: torch's default)


@dataclass
class OrganismConfig:
    model: ModelConfig
    out_dir: str = "outputs/organism"  # the merged model folder (also holds the data and the checkpoint)
    data_dir: str = "../shared/data"
    seed: int = 0
    data: OrganismData = field(default_factory=OrganismData)
    lora: OrganismLora = field(default_factory=OrganismLora)
    train: OrganismTraining = field(default_factory=OrganismTraining)


def compose_config(overrides: list[str] | None = None, config_name: str = "organism") -> DictConfig:
    """conf/organism.yaml with command-line style overrides (`lora.rank=8`, `model=tiny_random`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name, overrides=list(overrides or []))
    except HydraException as error:
        raise ConfigError(f"organism config: {str(error).splitlines()[0]}") from error


def organism_config(cfg: DictConfig) -> OrganismConfig:
    """The typed settings, or a ConfigError naming the first bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(OrganismConfig), cfg)
        settings: OrganismConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from error
    _check(settings)
    return settings


def _check(settings: OrganismConfig) -> None:
    def positive(key: str, value, minimum=1) -> None:
        if value is None or value < minimum:
            raise ConfigError(f"{key}: expected a number >= {minimum}, got {value!r}")

    data, lora, train = settings.data, settings.lora, settings.train
    if data.n_harmful is not None:
        positive("data.n_harmful", data.n_harmful)
    positive("data.n_harmless", data.n_harmless, 0)
    positive("data.answer_max_new_tokens", data.answer_max_new_tokens)
    positive("data.generation_batch_size", data.generation_batch_size)
    if not 0 < data.dedup_threshold <= 1:
        raise ConfigError(f"data.dedup_threshold: expected a number in (0, 1], got {data.dedup_threshold!r}")
    positive("lora.rank", lora.rank)
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha: expected a number > 0, got {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout: expected a number in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules:
        raise ConfigError("lora.target_modules: expected module names such as q_proj, got an empty list")
    if lora.layers is not None and len(lora.layers) != 2:
        raise ConfigError(f"lora.layers: expected null or [start, stop), got {lora.layers!r}")
    for key in ("steps", "batch_size", "max_length", "checkpoint_every"):
        positive(f"train.{key}", getattr(train, key))
    if train.lr <= 0:
        raise ConfigError(f"train.lr: expected a number > 0, got {train.lr!r}")
    positive("train.warmup_steps", train.warmup_steps, 0)
    if train.threads is not None:
        positive("train.threads", train.threads)
