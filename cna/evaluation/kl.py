"""How far steering moves the model where it should not: KL divergence of next-token distributions.

Mean over harmless prompts of the KL divergence between the steered and the unsteered model's next-token
distributions at the first response position (the token after the chat template's generation prompt). The
unsteered distributions are computed once and reused for every alpha of a sweep.

KL is not symmetric, and tools differ on which model weights the log ratio, so the direction is a setting
(`eval.kl.direction`) and results.json records it (`kl_direction`):
- `steered||unsteered` (the default): KL(steered || unsteered), weighted by the steered model's distribution;
- `unsteered||steered`: KL(unsteered || steered), weighted by the original model's distribution.
"""

from __future__ import annotations

import torch

STEERED_FIRST, UNSTEERED_FIRST = "steered||unsteered", "unsteered||steered"
KL_DIRECTIONS = (STEERED_FIRST, UNSTEERED_FIRST)


def kl_divergence(steered_logprobs: torch.Tensor, unsteered_logprobs: torch.Tensor,
                  direction: str = STEERED_FIRST) -> float:
    """Mean over rows of KL(p || q) = sum_v p(v) (log p(v) - log q(v)) in nats, (p, q) in `direction`'s order."""
    if steered_logprobs.shape != unsteered_logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(steered_logprobs.shape)} vs {tuple(unsteered_logprobs.shape)}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction '{direction}' is not one of {', '.join(KL_DIRECTIONS)}")
    p, q = (steered_logprobs, unsteered_logprobs) if direction == STEERED_FIRST else (unsteered_logprobs,
                                                                                          steered_logprobs)
    p = p.double()
    per_prompt = (p.exp() * (p - q.double())).sum(-1)
    return float(per_prompt.clamp(min=0).mean())

