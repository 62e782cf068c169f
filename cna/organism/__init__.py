"""A model organism: a chat model taught to refuse by a LoRA fine-tune, to compare before and after.

    python -m cna.organism                                   # conf/organism.yaml: smollm2-135m-instruct + refusal
    python -m cna.organism lora.layers=[0.0,0.5] out_dir=DIR # the control: adapters in the first half only

Stages: the training set (cna.organism.data), LoRA training with checkpoints (cna.organism.train), the merged
model saved as an ordinary folder with a card (`organism.json`, `README.md`). Re-running a killed run goes on
from its last checkpoint; re-running a finished one does nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cna.errors import ConfigError
from cna.models import load_model
from cna.organism.config import OrganismConfig, organism_config
from cna.organism.data import build_training_data
from cna.organism.train import finished, save_organism, train_lora, training_sha256

log = logging.getLogger(__name__)

__all__ = ["OrganismConfig", "make_organism", "organism_config"]


def make_organism(settings: OrganismConfig) -> Path:
    """Build, train and save the organism into settings.out_dir (or find it there, complete); returns the folder."""
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    lm = load_model(settings.model.spec())
    data = build_training_data(settings, lm)
    done = finished(settings)
    if done is not None:
        if done.get("recipe_sha256") != training_sha256(settings, data):
            raise ConfigError(f"out_dir: '{settings.out_dir}' holds an organism of another recipe; choose another "
                              "out_dir or delete that folder")
        log.info("%s is complete for this recipe: nothing to do", settings.out_dir)
        return Path(settings.out_dir)
    model, record = train_lora(settings, lm, data)
    return save_organism(settings, lm, model, data, record)
