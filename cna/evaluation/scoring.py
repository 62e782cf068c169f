"""Batched next-token log-probabilities: the one scoring primitive behind MMLU, KL and the LLM judge."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from cna.batching import length_sorted_batches, pad_batch, position_ids
from cna.models import input_device
from cna.prefix import LayerPrefixReuse


def next_token_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    max_batch_tokens: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
    reuse: LayerPrefixReuse | None = None,
) -> torch.Tensor:
    """log p(next token | prompt) for every prompt, float32 on CPU, in prompt order.

    [n, vocab], or [n, len(token_ids)] when only some tokens matter (normalised over the whole vocabulary).
    `max_batch_tokens` caps a batch's padded tokens: prompts of very different lengths (MMLU's run from under
    100 to over 600 tokens) would otherwise pad a whole batch to its longest.
    With `reuse`, a second call on the same prompts runs only the layers from the intervention's lowest one.
    """
    device = input_device(model)
    rows_out: list[torch.Tensor | None] = [None] * len(prompts)
    selected = None if token_ids is None else torch.tensor(list(token_ids))
    batches = list(length_sorted_batches(prompts, batch_size, max_batch_tokens))
    prefix = reuse.prefix(prompts, batches) if reuse is not None else None
    with torch.inference_mode():
        for index, rows in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)):
            # Left padding puts every prompt's last token in the final column: one logit row each.
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, side="left")
            with prefix.forward(index) if prefix is not None else nullcontext():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=position_ids(mask).to(device), use_cache=False, logits_to_keep=1).logits
            logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
            if selected is not None:
                logprobs = logprobs[:, selected]
            for row, values in zip(rows, logprobs, strict=True):
                rows_out[row] = values
    return torch.stack(rows_out)
