"""What an engine is: a config, a check before any model loads, and three services for the strength sweep.

An engine starts from the loaded transformers model (discovery ran on it), then for every strength point
- `steering(intervention, alpha, multiplier)`: a context in which its model is steered, restored on leaving;
- `generate(prompts, ...)`: greedy continuations of tokenised prompts (new token ids, stop token stripped);
- `next_token_logprobs(prompts, ...)`: log p(next token | prompt), the one scoring primitive of MMLU and KL.
Token ids in, token ids out: both engines see the same tokens and the session decodes with the same tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from cna.interventions import Intervention
    from cna.models import LoadedModel
    from cna.prefix import LayerPrefixReuse


class Engine(ABC):
    """Generation and next-token scoring of one loaded model, steered point by point; see the module docstring."""

    name: ClassVar[str]  # the registry key, `engine.name`
    config_type: ClassVar[type]
    runs_transformers_model: ClassVar[bool] = False  # steers and runs the transformers model itself (cna's loops may)

    @classmethod  # noqa: B027 - an engine that runs whatever the job asks has nothing to check
    def check(cls, config, job) -> None:
        """Raise ConfigError (one line naming the key) where this engine cannot run the job as configured (a method,
        mode or position it cannot express, a missing package); before any model loads."""

    @classmethod
    @abstractmethod
    def start(cls, config, lm: LoadedModel, job) -> Engine:
        """The engine for a job, serving every point of it (loaded once)."""

    def identity(self) -> dict[str, Any]:
        """What, beyond the model and the evaluation, the unsteered point's values depend on (the baseline key)."""
        return {}

    @property
    def prefix_reuse(self) -> bool:
        """Whether MMLU and KL may run only the layers an intervention changes (cna.prefix: transformers only)."""
        return False

    @abstractmethod
    def intervention(self, intervention: Intervention) -> Intervention:
        """The job's intervention (built on the transformers model by its method) as it steers this engine's model."""

    @abstractmethod
    def steering(self, intervention: Intervention, alpha: float, multiplier: float | None) -> AbstractContextManager:
        """The model steered at this point (the intervention from `intervention`); restored on leaving, exception
        or not."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int, progress: bool,
                 desc: str) -> list[list[int]]:
        """Greedy continuations, stop token stripped, in the order of `prompts`."""

    @abstractmethod
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], *, token_ids: Sequence[int] | None = None,
                            batch_size: int, max_batch_tokens: int | None, progress: bool, desc: str,
                            reuse: LayerPrefixReuse | None = None) -> torch.Tensor:
        """log p(next token | prompt), float32 on CPU, [n, vocab] or [n, len(token_ids)] (normalised over the whole
        vocabulary), in prompt order."""

    def close(self) -> None:  # noqa: B027 - an engine that holds nothing beyond the model has nothing to free
        """Free what the engine holds beyond the transformers model."""
