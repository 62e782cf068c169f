"""Reasoning blocks of thinking models: kept in the record, removed from the answer, bounded by a token budget.

A thinking model writes its reasoning before its answer: `<think> ... </think>` (Qwen3, QwQ, the DeepSeek-R1
distills, whose chat template opens the block in the prompt) or gpt-oss's analysis channel
(`<|channel|>analysis<|message|> ... <|end|><|start|>assistant<|channel|>final<|message|>`). A refusal
classifier or a judge that read the reasoning would score the model's deliberation ("the user asks for X; I
must not...") as its answer. So every response is split: `response` keeps everything generated, `answer` is the
text after the reasoning block, and only the answer is classified, judged and scored.

Budget: the reasoning may take up to `reasoning_tokens` tokens; a block still open then is closed for the
model (its closing marker appended, the budget forcing of Qwen3's guide) and the answer gets `max_new_tokens`
of its own, so answers of thinking and plain models are cut at the same length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cna.errors import ConfigError
from cna.generation import generate

REASONING = ("auto", "none", "think", "harmony")


@dataclass(frozen=True)
class ReasoningFormat:
    """How one family marks its reasoning: the text that opens a block, the text after which the answer starts,
    and the text that closes a block the budget cut short."""

    name: str
    start: str
    end: str
    close: str


FORMATS = {
    "think": ReasoningFormat("think", "<think>", "</think>", "</think>\n\n"),
    "harmony": ReasoningFormat("harmony", "<|channel|>analysis<|message|>", "<|channel|>final<|message|>",
                               "<|end|><|start|>assistant<|channel|>final<|message|>"),
}


def reasoning_format(tokenizer, setting: str = "auto") -> ReasoningFormat | None:
    """The format `setting` names; `auto`: the one whose markers the tokenizer has as single tokens, or None."""
    if setting not in REASONING:
        raise ConfigError(f"model.reasoning: expected one of {', '.join(REASONING)}, got {setting!r}")
    if setting == "none":
        return None
    if setting != "auto":
        return FORMATS[setting]
    vocabulary = tokenizer.get_vocab()
    if "</think>" in vocabulary:
        return FORMATS["think"]
    if "<|channel|>" in vocabulary and "<|message|>" in vocabulary:
        return FORMATS["harmony"]
    return None


@dataclass(frozen=True)
class Generation:
    """One generated response: every token, and the answer the classifiers read."""

    tokens: list[int]  # every generated token id, reasoning (and a closing marker the budget added) included
    response: str  # all of it as text: generations.jsonl's `response`
    answer_tokens: list[int]
    answer: str  # the text after the reasoning block: what classifiers, judges and quality read
    reasoning: str | None = None  # the reasoning block's text; None where the model wrote none
    reasoning_tokens: int = 0
    closed_by_budget: bool = False  # the block was still open at the reasoning budget and closed for the model

    def record(self) -> dict:
        """The fields a generations.jsonl line gains beside `response` for a thinking model."""
        return {"answer": self.answer, "reasoning": self.reasoning, "reasoning_tokens": self.reasoning_tokens,
                "closed_by_budget": self.closed_by_budget}


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _last(tokens: Sequence[int], marker: list[int]) -> int | None:
    """Where the last occurrence of `marker` in `tokens` ends, or None."""
    width = len(marker)
    for start in range(len(tokens) - width, -1, -1):
        if list(tokens[start:start + width]) == marker:
            return start + width
    return None


class ReasoningSplitter:
    """Finds a format's markers in token ids (the markers' own ids: exact where they are single tokens)."""

    def __init__(self, tokenizer, fmt: ReasoningFormat):
        self.tokenizer, self.format = tokenizer, fmt
        self.start, self.end, self.close = _ids(tokenizer, fmt.start), _ids(tokenizer, fmt.end), _ids(tokenizer,
                                                                                                     fmt.close)

    def opened_in(self, prompt: Sequence[int]) -> bool:
        """The prompt leaves a reasoning block open for the model (the R1 distills' templates end in `<think>`)."""
        opened, closed = _last(prompt, self.start), _last(prompt, self.end)
        return opened is not None and (closed is None or closed < opened)

    def closed_in(self, prompt: Sequence[int]) -> bool:
        """The prompt already holds the answer's marker after its last block (Qwen3 with enable_thinking=False
        renders an empty, closed block): the model answers at once."""
        opened, closed = _last(prompt, self.start), _last(prompt, self.end)
        return closed is not None and (opened is None or closed > opened)

    def split(self, tokens: Sequence[int], prompt_open: bool) -> tuple[int | None, bool]:
        """(where the answer starts in `tokens`, or None where no block was written; whether the block is still
        open at the end of `tokens`)."""
        after = _last(tokens, self.end)
        if after is not None:
            return after, False
        if prompt_open or _last(tokens, self.start) is not None:
            return len(tokens), True
        return None, False

    def generation(self, tokens: list[int], answer_from: int | None, closed_by_budget: bool) -> Generation:
        decode = self.tokenizer.decode
        answer = tokens if answer_from is None else tokens[answer_from:]
        reasoning = None if answer_from is None else tokens[:answer_from]
        return Generation(tokens, decode(tokens, skip_special_tokens=False), list(answer),
                          decode(answer, skip_special_tokens=True),
                          None if reasoning is None else decode(reasoning, skip_special_tokens=True),
                          0 if reasoning is None else len(reasoning), closed_by_budget)


def generate_with_reasoning(model, tokenizer, prompts: Sequence[Sequence[int]], fmt: ReasoningFormat, *,
                            reasoning_tokens: int, max_new_tokens: int, **settings) -> list[Generation]:
    """Greedy responses of a thinking model: the reasoning up to `reasoning_tokens`, then `max_new_tokens` of answer.

    One pass of `reasoning_tokens` for the rows whose prompt does not close the block itself; a row that ended
    its block in it keeps what followed (cut to the answer budget), a row still reasoning at the budget is closed
    for the model, and the rows whose answer the first pass cut short go on in a second pass. Greedy decoding
    makes a cut continuation equal to a shorter generation, so every answer is what a generation with its own
    budget would have written. `settings`: generate's (pad_token_id, eos_token_id, batch_size, refill, ...).
    """
    splitter = ReasoningSplitter(tokenizer, fmt)
    answered_at_once = [i for i, prompt in enumerate(prompts) if splitter.closed_in(prompt)]
    thinking = [i for i in range(len(prompts)) if i not in set(answered_at_once)]
    first: dict[int, list[int]] = {}
    for rows, budget in ((answered_at_once, max_new_tokens), (thinking, reasoning_tokens)):
        if rows:
            outputs = generate(model, [prompts[i] for i in rows], max_new_tokens=budget, **settings)
            first.update(zip(rows, outputs, strict=True))
    results: dict[int, Generation] = {}
    more: dict[int, tuple[list[int], int | None, int, bool]] = {}  # row -> (tokens so far, answer start, room, forced)
    for i, tokens in first.items():
        if i in set(answered_at_once):
            results[i] = splitter.generation(tokens, None, False)
            continue
        ended = len(tokens) < reasoning_tokens  # generate strips the end-of-sequence token that stopped the row
        start, still_open = splitter.split(tokens, splitter.opened_in(prompts[i]))
        if still_open and not ended:  # the budget ran out mid-reasoning: close the block for the model
            more[i] = (tokens + splitter.close, len(tokens) + len(splitter.close), max_new_tokens, True)
            continue
        answer = tokens[start or 0:] if not still_open else []
        room = max_new_tokens - len(answer)
        if ended or room <= 0:
            kept = tokens[: (start or 0) + max_new_tokens] if not still_open else tokens
            results[i] = splitter.generation(kept, start, False)
        else:
            more[i] = (tokens, start, room, False)
    if more:
        rows = list(more)
        continued = generate(model, [list(prompts[i]) + more[i][0] for i in rows],
                             max_new_tokens=max(more[i][2] for i in rows), **settings)
        for i, tail in zip(rows, continued, strict=True):
            tokens, start, room, forced = more[i]
            results[i] = splitter.generation(tokens + tail[:room], start, forced)
    return [results[i] for i in range(len(prompts))]
