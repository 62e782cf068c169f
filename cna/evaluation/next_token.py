"""Next-token behaviours (the paper's capitals and subject-verb agreement): no generation, one forward per prompt.

Every evaluation row carries a prompt, the token that answers it (`target`) and the token the other side of the
contrast would give (`counterfactual`): " Paris" against " French" for "The capital of France is", and the
reverse for "The official language of France is". Two held-out sets: `target` (the positive side, where removal
should lower accuracy) and `control` (the negative side, where removal should not change it and induction,
m > 1, pulls it toward the counterfactual). Per set:

- accuracy: `top1`, the target's first token is the arg-max of the whole vocabulary ("the capital is Paris"),
  or `pairwise`, it outscores the counterfactual's (" is" over " are": the usual agreement score); Wilson 95%;
- logit difference: mean of logit(target) - logit(counterfactual), bootstrap 95%.

Targets and counterfactuals count by their first token; a row whose two first tokens coincide is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cna.data import PromptSource, load_prompts, packaged_rows, subsample
from cna.errors import ConfigError
from cna.evaluation.intervals import bootstrap_interval, wilson_interval
from cna.evaluation.metric import DataContext, Field, Metric, register_metric
from cna.evaluation.scoring import next_token_logprobs
from cna.schema import bounded, choice

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext, Session

ACCURACIES = ("top1", "pairwise")
SETS = ("target", "control")


@dataclass(frozen=True)
class TokenRow:
    prompt: str
    target: str
    counterfactual: str


def read_token_rows(source: PromptSource, key: str) -> list[TokenRow]:
    """Rows with `prompt`, `target` and `counterfactual` fields: a packaged JSONL set or a CSV/JSON/JSONL file."""
    columns = ("prompt", "target", "counterfactual")
    if source.packaged:
        rows = packaged_rows(source.packaged, source.subset)
        missing = next((c for c in columns if any(c not in row for row in rows)), None)
        if missing:
            raise ConfigError(f"{key}: packaged set '{source.packaged}' has rows without a '{missing}'")
        return [TokenRow(row["prompt"], row["target"], row["counterfactual"]) for row in rows]
    values = [load_prompts(dataclasses.replace(source, column=column)) for column in columns]
    return [TokenRow(*row) for row in zip(*values, strict=True)]


def first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"the answer {text!r} has no tokens")
    return ids[0]


@dataclass
class TokenSet:
    """A held-out set of (prompt, target, counterfactual) rows; n: how many are drawn (0: none, null: all)."""

    source: PromptSource = field(default_factory=PromptSource)
    n: int | None = bounded(None, 0, integer=True)


@dataclass
class NextTokenConfig:
    """`eval.next_token`: the behaviour's held-out sets and how accuracy is counted."""

    target: TokenSet = field(default_factory=TokenSet)  # the positive side: removal should lower accuracy here
    control: TokenSet = field(default_factory=TokenSet)  # the negative side: removal should leave it; m > 1 flips it
    accuracy: str = choice("top1", ACCURACIES)


@dataclass(frozen=True)
class TokenScores:
    """One set's scores at one point."""

    accuracy: float
    ci95: tuple[float, float]
    logit_diff: float
    logit_diff_ci95: tuple[float, float]
    n: int


def token_scores(logits: torch.Tensor, targets: Sequence[int], counterfactuals: Sequence[int],
                 accuracy: str = "top1", seed: int = 0) -> TokenScores:
    """Accuracy and mean logit difference from next-token log-probabilities [n, vocab] (log-softmax shifts every
    logit of a row by the same amount, so differences of log-probabilities are differences of logits)."""
    rows = torch.arange(len(targets))
    target = logits[rows, torch.tensor(list(targets))].double()
    other = logits[rows, torch.tensor(list(counterfactuals))].double()
    difference = (target - other).tolist()
    if accuracy == "top1":
        correct = (logits.argmax(-1) == torch.tensor(list(targets))).tolist()
    else:
        correct = [d > 0 for d in difference]
    hits = sum(map(bool, correct))
    return TokenScores(hits / len(correct), wilson_interval(hits, len(correct)), sum(difference) / len(difference),
                       bootstrap_interval(difference, seed=seed), len(correct))


@register_metric
class NextToken(Metric):
    """Target-token accuracy and logit difference on the behaviour's target and control sets."""

    name = "next_token"
    config_type = NextTokenConfig
    order = 15
    stage = "next_token"
    logged_when = "logged only by next-token behaviours (behaviour=capitals, sva, or custom with target tokens)"
    objectives = ("target_accuracy", "target_logit_diff")
    fields = (Field("target_accuracy", "target accuracy", "target_accuracy_ci95",
                    about="Accuracy of the answer token on the positive side's held-out prompts."),
              Field("target_logit_diff", "target logit diff", "target_logit_diff_ci95", digits=".2f",
                    about="Mean logit(answer) - logit(counterfactual) there."),
              Field("control_accuracy", "control accuracy", "control_accuracy_ci95",
                    about="The same on the negative side's prompts: removal should leave it."),
              Field("control_logit_diff", "control logit diff", "control_logit_diff_ci95", digits=".2f",
                    about="Mean logit(answer) - logit(counterfactual) on the negative side: induction lowers it."))

    def __init__(self, sets: dict[str, list[TokenRow]], accuracy: str = "top1", seed: int = 0):
        if accuracy not in ACCURACIES:
            raise ConfigError(f"eval.next_token.accuracy: expected one of {', '.join(ACCURACIES)}, got {accuracy!r}")
        self.sets = {name: list(rows) for name, rows in sets.items() if rows}
        self.accuracy, self.seed = accuracy, seed
        self._tokens: dict[str, tuple[list[int], list[int]]] = {}

    @classmethod
    def held_out(cls, config: NextTokenConfig) -> list[str]:
        return [row.prompt for name in SETS for row in _rows(getattr(config, name), name, drawn=False)]

    @classmethod
    def from_config(cls, config: NextTokenConfig, data: DataContext) -> NextToken | None:
        sets = {name: _rows(getattr(config, name), name, seed=data.seed) for name in SETS}
        metric = cls(sets, config.accuracy, data.seed)
        return metric if metric.sets else None

    def evaluated_sets(self) -> dict[str, list[str]]:
        return {f"{self.name}_{name}": [row.prompt for row in rows] for name, rows in self.sets.items()}

    def identity(self) -> dict:
        return {"sets": {name: [dataclasses.astuple(row) for row in rows] for name, rows in self.sets.items()},
                "accuracy": self.accuracy}

    def setup(self, session: Session) -> None:
        for name, rows in self.sets.items():
            targets = [first_token(session.tokenizer, row.target) for row in rows]
            others = [first_token(session.tokenizer, row.counterfactual) for row in rows]
            same = next((row for row, t, o in zip(rows, targets, others, strict=True) if t == o), None)
            if same is not None:
                raise ConfigError(f"eval.next_token.{name}: the target {same.target!r} and counterfactual "
                                  f"{same.counterfactual!r} of {same.prompt!r} start with the same token")
            self._tokens[name] = (targets, others)

    def measure(self, point: PointContext) -> dict:
        session = point.session
        if not self._tokens:
            self.setup(session)
        values = {}
        for name, rows in self.sets.items():
            logprobs = next_token_logprobs(session.model, session.encode([row.prompt for row in rows]),
                                           pad_token_id=session.tokenizer.pad_token_id,
                                           batch_size=session.batch_size,
                                           max_batch_tokens=session.scoring_batch_tokens, progress=session.progress,
                                           desc=f"{name} a={point.alpha:g}", reuse=session.reuse)
            scores = token_scores(logprobs, *self._tokens[name], accuracy=self.accuracy, seed=self.seed)
            values.update({f"{name}_accuracy": scores.accuracy, f"{name}_accuracy_ci95": list(scores.ci95),
                           f"{name}_logit_diff": scores.logit_diff,
                           f"{name}_logit_diff_ci95": list(scores.logit_diff_ci95), f"n_{name}": scores.n})
        return values

    def results(self) -> dict:
        return {"next_token_accuracy": self.accuracy}


def _rows(token_set: TokenSet, name: str, *, seed: int = 0, drawn: bool = True) -> list[TokenRow]:
    if token_set.n == 0:
        return []
    rows = read_token_rows(token_set.source, f"eval.next_token.{name}")
    if not drawn:
        return rows
    if token_set.n is not None and token_set.n > len(rows):
        raise ConfigError(f"eval.next_token.{name}.n: expected at most {len(rows)} (the set's size), got {token_set.n}")
    return rows if token_set.n is None else subsample(rows, token_set.n, seed)
