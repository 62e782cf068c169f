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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cna.data import PromptSource
from cna.errors import ConfigError
from cna.evaluation.metric import DataContext, EvalSet, Field, Metric, evaluation_set, register_metric
from cna.schema import bounded, choice

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext, Session

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



@dataclass
class KlConfig:
    """`eval.kl`: harmless prompts whose first-response-token distributions are compared (n: 0 switches it off)."""

    source: PromptSource = field(default_factory=PromptSource)
    n: int = bounded(100, 0, integer=True)
    direction: str = choice(STEERED_FIRST, KL_DIRECTIONS)  # recorded as kl_direction


@register_metric
class Kl(Metric):
    """KL divergence from the unsteered model: how far steering moves the model where it should not."""

    name = "kl"
    config_type = KlConfig
    order = 60
    objectives = ("kl_divergence",)
    fields = (Field("kl_divergence", "KL", digits=".4g",
                    about="KL(steered || unsteered) of the next-token distribution at the first response token."),)

    def __init__(self, prompts: Sequence[str], direction: str = STEERED_FIRST):
        if direction not in KL_DIRECTIONS:
            raise ConfigError(f"eval.kl.direction: expected one of {', '.join(KL_DIRECTIONS)}, got {direction!r}")
        self.prompts, self.direction = list(prompts), direction
        self._unsteered: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: KlConfig, data: DataContext) -> Kl | None:
        prompts = evaluation_set(EvalSet(config.source, config.n), "eval.kl", data.seed)
        return cls(prompts, config.direction) if prompts else None

    def evaluated_sets(self) -> dict[str, list[str]]:
        return {"kl": self.prompts}

    def identity(self) -> dict:
        return {"prompts": self.prompts, "direction": self.direction}

    def _logprobs(self, session: Session) -> torch.Tensor:
        return session.next_token_logprobs(session.encode(self.prompts), "kl")

    def setup(self, session: Session) -> None:
        """The unsteered distributions, once per job (and from the baseline cache across a sweep's jobs)."""
        self._unsteered = session.cached("kl", lambda: self._logprobs(session))

    def measure(self, point: PointContext) -> dict:
        if self._unsteered is None:
            self.setup(point.session)
        if point.alpha == 0.0:  # the unsteered model itself (alpha 0 is bit-identical): no forward needed
            return {"kl_divergence": 0.0}
        return {"kl_divergence": kl_divergence(self._logprobs(point.session), self._unsteered, self.direction)}

    def results(self) -> dict:
        return {"kl_direction": self.direction}  # kl_divergence is KL(first || second)
