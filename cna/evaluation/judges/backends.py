"""Judge backends: who answers the rubric's questions.

`HFBackend` runs a local transformers model, always its own model object, never the steered one, so no
steering hook can reach it; `OpenAIBackend` asks any OpenAI-compatible server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from tqdm.auto import tqdm

from cna.errors import CnaError, ConfigError
from cna.evaluation.judges.yesno import LLMRefusalJudge


class Backend(Protocol):
    identity: str  # the judge model, for the cache key

    def complete(self, questions: Sequence[str], max_new_tokens: int) -> list[str]: ...


class HFBackend:
    """A local transformers chat model, loaded as its own object: steering hooks on another model never reach it."""

    def __init__(self, spec, *, batch_size: int = 8):
        from cna.models import load_model

        self.lm = load_model(spec)
        self.batch_size = batch_size
        self.identity = f"hf:{spec.name}@{spec.revision or 'main'}:{next(self.lm.model.parameters()).dtype}"

    def complete(self, questions: Sequence[str], max_new_tokens: int) -> list[str]:
        from cna.data import encode_prompts
        from cna.generation import eos_token_ids, generate

        tokenizer = self.lm.tokenizer
        tokens = generate(self.lm.model, encode_prompts(tokenizer, list(questions), "chat"),
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(self.lm.model, tokenizer),
                          max_new_tokens=max_new_tokens, batch_size=self.batch_size, desc="judge")
        return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def yes_probability(self, questions: Sequence[str]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the next token after each question (the yes/no judge's verdict)."""
        judge = LLMRefusalJudge(self.lm.model, self.lm.tokenizer, batch_size=self.batch_size)
        return judge.next_token_yes_probability(questions)


class OpenAIBackend:
    """Any OpenAI-compatible chat server (vLLM, SGLang, llama.cpp server, `transformers serve`, a hosted API).

    Requests run `concurrency` at a time in threads, greedy (temperature 0); a failed request is retried
    `retries` times with exponential backoff (1 s, 2 s, 4 s, ...) before the job stops with one line.
    """

    def __init__(self, *, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 120, retries: int = 3, backoff_s: float = 1.0):
        try:
            from openai import OpenAI
        except ImportError as error:
            raise ConfigError("eval.judge.backend: 'openai' needs the openai client: pip install 'cna[judge]'") \
                from error
        key = os.environ.get(api_key_env) if api_key_env else None
        # Local servers take any key; the client refuses to start without one.
        self.client = OpenAI(base_url=base_url, api_key=key or "EMPTY", timeout=timeout_s, max_retries=0)
        self.model, self.base_url = model, base_url
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self.identity = f"openai:{model}"

    def _ask(self, question: str, max_new_tokens: int) -> str:
        import openai

        for attempt in range(self.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": question}], temperature=0,
                    max_tokens=max_new_tokens)
                return reply.choices[0].message.content or ""
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as error:
                if attempt == self.retries:
                    raise CnaError(f"judge server {self.base_url}: {type(error).__name__} after "
                                   f"{self.retries + 1} tries: {error}") from error
                time.sleep(self.backoff_s * 2**attempt)
            except openai.APIStatusError as error:  # 4xx: a wrong model name or key; retrying cannot help
                raise CnaError(f"judge server {self.base_url} refused the request ({error.status_code}): "
                               f"{error.message}") from error
        raise AssertionError("unreachable")

    def complete(self, questions: Sequence[str], max_new_tokens: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = pool.map(lambda q: self._ask(q, max_new_tokens), questions)
            return list(tqdm(answers, total=len(questions), desc="judge", unit="response", leave=False))
