"""The transformers engine (`engine=hf`, the default): cna's own batched greedy loop (refilled: a row that ends
makes room for a waiting prompt), batched next-token scoring with layer-prefix reuse, and steering by hooks, or
by weights for CNA in scale mode at every position with `bake_steering=true`."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from cna.engines import register_engine
from cna.engines.base import Engine
from cna.evaluation.scoring import next_token_logprobs
from cna.generation import eos_token_ids, generate
from cna.interventions import Intervention
from cna.prefix import LayerPrefixReuse
from cna.schema import choice


@dataclass
class HfEngineConfig:
    """`engine=hf` (conf/engine/hf.yaml)."""

    name: str = choice("hf", ("hf",))


@register_engine
class HfEngine(Engine):
    name = "hf"
    config_type = HfEngineConfig
    runs_transformers_model = True

    def __init__(self, model, tokenizer, *, refill: bool = True, bake: bool = False):
        self.model, self.tokenizer, self.refill, self.bake = model, tokenizer, refill, bake

    @classmethod
    def start(cls, config: HfEngineConfig, lm, job) -> HfEngine:
        return cls(lm.model, lm.tokenizer, refill=job.refill_generation, bake=job.bake_steering)

    @property
    def prefix_reuse(self) -> bool:
        return True

    def intervention(self, intervention: Intervention) -> Intervention:
        return intervention  # methods build their interventions on the transformers model

    def steering(self, intervention: Intervention, alpha: float, multiplier: float | None) -> AbstractContextManager:
        """By hooks, or with `bake` by weights that carry the intervention (CNA in scale mode at every position:
        the circuit's multipliers written into down_proj, restored on leaving)."""
        strength = 1.0 - alpha if multiplier is None else multiplier
        baked = intervention.baked(strength) if self.bake else None
        if baked is not None:
            return baked
        return intervention.steer(alpha) if multiplier is None else intervention.multiply(multiplier)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int, progress: bool,
                 desc: str) -> list[list[int]]:
        return generate(self.model, prompts, pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=eos_token_ids(self.model, self.tokenizer), max_new_tokens=max_new_tokens,
                        batch_size=batch_size, refill=self.refill, progress=progress, desc=desc)

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], *, token_ids: Sequence[int] | None = None,
                            batch_size: int, max_batch_tokens: int | None, progress: bool, desc: str,
                            reuse: LayerPrefixReuse | None = None) -> torch.Tensor:
        return next_token_logprobs(self.model, prompts, pad_token_id=self.tokenizer.pad_token_id, token_ids=token_ids,
                                   batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=progress,
                                   desc=desc, reuse=reuse)
