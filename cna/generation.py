"""Batched greedy generation: left padding, attention masks, KV cache; works under any intervention.

With `refill`, rows that end (EOS, often early: refusals are short) leave the batch at once and waiting
prompts take their places, so the batch stays full: the running batch's KV cache keeps only unfinished rows,
and newcomers are prefilled together and joined to it, both left-padded to a common length (the padding is
masked, each row keeps its own position ids). Every row sees exactly the computation of plain greedy decoding;
the tests compare the tokens with `model.generate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from cna.batching import length_sorted_batches, pad_batch, position_ids
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
    refill: bool = False,
) -> list[list[int]]:
    """Greedy continuations (new token ids, EOS and padding stripped), in the order of `prompts`."""
    if refill and refillable(model):
        return _generate_refilled(model, prompts, pad_token_id=pad_token_id, stops=set(eos_token_id),
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=desc)
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


# Settings of a model's generation config that would make `model.generate` more than an arg-max.
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0,
               "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None}


def refillable(model) -> bool:
    """Plain greedy decoding with a cache of full-attention layers (no sliding windows: their cache is trimmed)."""
    config = model.generation_config
    if any(getattr(config, key, default) not in (None, default) for key, default in _PROCESSORS.items()):
        return False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return not getattr(text_config, "sliding_window", None) or not getattr(text_config, "use_sliding_window", True)


class _Running:
    """The rows being decoded: their prompt index, tokens so far, attention mask, next position, KV cache."""

    def __init__(self):
        self.rows: list[int] = []
        self.tokens: list[list[int]] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.cache = None

    def join(self, rows: list[int], first: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> None:
        """Add prefilled rows: both caches and masks are left-padded to the longer length, then stacked."""
        self.rows += rows
        self.tokens += [[token] for token in first.tolist()]
        if self.cache is None:
            self.mask, self.positions, self.cache = mask, positions, cache
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        for ours, theirs in zip(self.cache.layers, cache.layers, strict=True):
            ours.keys = torch.cat([_left_pad(ours.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            ours.values = torch.cat([_left_pad(ours.values, width, 2), _left_pad(theirs.values, width, 2)])

    def keep(self, keep: list[int]) -> None:
        """Keep these rows (by place, at least one) and drop the columns that are padding for all of them."""
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        start = int(self.mask.any(0).long().argmax())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.25, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_tokens(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].float().argmax(-1).cpu()


def _generate_refilled(model, prompts, *, pad_token_id: int, stops: set[int], max_new_tokens: int, batch_size: int,
                       progress: bool, desc: str) -> list[list[int]]:
    from transformers import DynamicCache

    device = input_device(model)
    with_cache = cache_keyword(model)
    waiting = [row for batch in length_sorted_batches(prompts, len(prompts) or 1) for row in batch]  # longest first
    outputs: list[list[int] | None] = [None] * len(prompts)
    running = _Running()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    with torch.inference_mode():
        while waiting or running.rows:
            free = batch_size - len(running.rows)
            # Newcomers are prefilled together: wait until a quarter of the batch is free (or it is empty).
            if waiting and (free >= max(1, batch_size // 4) or not running.rows):
                rows, waiting = waiting[:free], waiting[free:]
                ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, side="left")
                positions = position_ids(mask)
                cache = DynamicCache()
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), use_cache=True, logits_to_keep=1,
                               **{with_cache: cache}).logits
                running.join(rows, _next_tokens(logits), mask, positions[:, -1] + 1, cache)
            else:
                last = torch.tensor([tokens[-1] for tokens in running.tokens]).unsqueeze(1)
                running.mask = torch.cat([running.mask, torch.ones_like(last)], dim=1)
                logits = model(input_ids=last.to(device), attention_mask=running.mask.to(device),
                               position_ids=running.positions.unsqueeze(1).to(device), use_cache=True,
                               logits_to_keep=1, **{with_cache: running.cache}).logits
                running.positions = running.positions + 1
                for tokens, token in zip(running.tokens, _next_tokens(logits).tolist(), strict=True):
                    tokens.append(token)
            keep = []
            for place, (row, tokens) in enumerate(zip(running.rows, running.tokens, strict=True)):
                if tokens[-1] in stops or len(tokens) == max_new_tokens:
                    outputs[row] = tokens[:-1] if tokens[-1] in stops else tokens
                    bar.update()
                else:
                    keep.append(place)
            if not keep:
                running = _Running()
            elif len(keep) < len(running.rows):
                running.keep(keep)
    bar.close()
    return outputs
