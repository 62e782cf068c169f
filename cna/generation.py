"""Batched greedy generation: left padding, attention masks, KV cache; works under any intervention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from cna.batching import length_sorted_batches, pad_batch
from cna.models import input_device


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's (chat models often list several) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: list[int],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generation",
) -> list[list[int]]:
    """Greedy continuations (new token ids, EOS and padding stripped), in the order of `prompts`."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    device = input_device(model)
    stops = set(eos_token_id)
    outputs: list[list[int] | None] = [None] * len(prompts)
    batches = list(length_sorted_batches(prompts, batch_size))
    with torch.inference_mode():
        for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, side="left")
            sequences = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for row, continuation in zip(rows, sequences[:, ids.shape[1]:].tolist(), strict=True):
                end = next((i for i, token in enumerate(continuation) if token in stops), len(continuation))
                outputs[row] = continuation[:end]
    return outputs
