"""Padding token sequences into batches, shortest padding first."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

PAD_SIDES = ("left", "right")


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and attention mask [B, T] (1 = real token)."""
    if side not in PAD_SIDES:
        raise ValueError(f"padding side '{side}' is not one of {PAD_SIDES}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so padding on either side changes nothing."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding alike."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).argmax(-1)


def length_sorted_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Row indices in batches of similar length (longest first), to waste little compute on padding.

    With `max_tokens`, a batch also holds at most that many padded tokens (but always at least one
    row): activation memory grows with batch x length, so a token budget bounds it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    start = 0
    while start < len(order):
        longest = max(1, len(sequences[order[start]]))
        rows = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // longest))
        yield order[start : start + rows]
        start += rows
