"""KL divergence of the steered from the unsteered model where it should not move (heretic's metric).

Mean over harmless prompts of KL(steered || unsteered) between next-token
distributions at the first response position (the token after the chat
template's generation prompt). The unsteered distributions are computed once
and reused for every alpha of a sweep.
"""

from __future__ import annotations

import torch


def kl_divergence(steered_logprobs: torch.Tensor, unsteered_logprobs: torch.Tensor) -> float:
    """Mean over rows of sum_v p_steered(v) (log p_steered(v) - log p_unsteered(v)), in nats."""
    if steered_logprobs.shape != unsteered_logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(steered_logprobs.shape)} vs {tuple(unsteered_logprobs.shape)}")
    steered = steered_logprobs.double()
    per_prompt = (steered.exp() * (steered - unsteered_logprobs.double())).sum(-1)
    return float(per_prompt.clamp(min=0).mean())
