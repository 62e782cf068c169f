"""Causal neuron scores (beyond the paper): rank neurons by what they do to the output, not only by how they differ.

The paper ranks neuron j by delta_j = mean over positive prompts - mean over negative prompts of its
activation a_j (the input to `down_proj` at the last prompt token). A neuron can differ between the sets
without causing the behaviour; three more scores weigh delta by an effect and go through the same selection
(k, sign, layer range, universal filter):

- `projection`: delta_j x <w_j, r>, w_j neuron j's output weight (its `down_proj` column) and r the unit
  residual mean difference (positive - negative) at one layer, the one directional ablation uses. Positive:
  the neuron fires more on positive prompts *and* writes onto the positive side of r. No extra forward pass.
- `attribution` (attribution patching): M is the refusal score at the first response position, the log-odds
  that the response opens with a refusal token, log p_R - log(1 - p_R), with p_R the probability of the
  first tokens of `refusal_starts` (Arditi et al.'s refusal score). The score is the mean over positive
  prompts i of (a_ij - mean over negatives of a_j) x dM_i/da_ij: to first order, how much M falls when the
  neuron is patched from its value on the harmful prompt to its harmless mean. Positive: the neuron's
  harmful-side value raises refusal.
- `target` (single-prompt attribution, as in the paper's code): M_i = logit(target_i) - logit(counterfactual_i)
  for prompt sets that carry target tokens; the counterfactual of positive prompt i is the target of negative
  prompt i (the packaged capitals and sva sets are paired by row). The score is the mean over positive prompts
  of a_ij x dM_i/da_ij: to first order, how much M falls when the neuron is zeroed. Positive: the neuron
  supports the positive set's answer.

Gradients are taken only with respect to the last-token activations at the `down_proj` inputs, through a
zero perturbation added there (so the forward values are unchanged), in length-sorted batches under a token
budget that bounds the autograd graph's memory. Parameters never require gradients during the pass and get
their flags back afterwards; every hook is removed on leaving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cna.batching import last_token_index, length_sorted_batches, pad_batch, position_ids
from cna.data import PromptSource, load_prompts, packaged_rows
from cna.discovery import (
    DISCOVERY_TOKEN_BUDGET,
    ActivationStatistics,
    NeuronScores,
    columns_by_layer,
    contrastive_scores,
)
from cna.errors import ConfigError
from cna.experts import expert_tap
from cna.hooks import attached, map_input
from cna.models import ArchitectureAdapter

SCORES = ("delta", "projection", "attribution", "target")
GRADIENT_SCORES = ("attribution", "target")  # the scores that need a backward pass

# (logits at the last prompt token [B, vocab] float32, the batch's prompt indices) -> the metric M per prompt [B]
Metric = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass
class GradientStatistics:
    """Sums over one prompt set of a x dM/da and of dM/da at the last token, [layers, neurons] float64 each."""

    n_prompts: int
    activation_gradient_sum: torch.Tensor
    gradient_sum: torch.Tensor

    def save(self, path: str | Path) -> Path:
        save_file({"activation_gradient_sum": self.activation_gradient_sum, "gradient_sum": self.gradient_sum},
                  str(path), metadata={"n_prompts": str(self.n_prompts)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> GradientStatistics:
        with safe_open(str(path), framework="pt") as handle:
            n_prompts = int(handle.metadata()["n_prompts"])
        tensors = load_file(str(path))
        return cls(n_prompts, tensors["activation_gradient_sum"], tensors["gradient_sum"])


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter requires a gradient inside the block; each gets its own flag back afterwards."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# (the batch's prompt indices, the layer, its columns on the layer's neuron axis, the last-token activations
# [B, columns] and dM/da [B, columns], float64 on the cpu) -> None; called once per neuron site and batch
BatchGradients = Callable[[list[int], int, slice, torch.Tensor, torch.Tensor], None]


def _gradient_pass(adapter: ArchitectureAdapter, prompts: Sequence[Sequence[int]], metric: Metric,
                   consume: BatchGradients, *, pad_token_id: int, batch_size: int, max_batch_tokens: int | None,
                   progress: bool, desc: str) -> None:
    """One forward and backward pass per batch; `consume` gets each neuron site's last-token activations and
    gradients (a dense layer's site, or a MoE layer's routed experts and its shared experts, one block each).

    In MoE layers a routed expert's neuron is opened only where the router chose the expert (elsewhere it computes
    nothing, and its gradient is 0); shared experts' neurons are opened as a dense layer's.
    """
    if not prompts:
        raise ConfigError(f"{desc}: the prompt set is empty")
    last: dict[str, torch.Tensor] = {}
    openings: list[_Opening] = []

    def open_site(opening: _Opening):
        def perturbed(x: torch.Tensor) -> torch.Tensor:
            shape, x = x.shape, x.reshape(len(last["index"]), -1, x.shape[-1])  # [B x T, width] in Qwen2-MoE
            rows, columns = torch.arange(x.shape[0], device=x.device), last["index"].to(x.device)
            opening.values = x[rows, columns].detach()
            zero = torch.zeros(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device, requires_grad=True)
            opening.perturbation = zero
            return x.index_put((rows, columns), x[rows, columns] + zero).reshape(shape)

        return perturbed

    def open_experts(opening: _Opening, experts):
        def perturbed(values: torch.Tensor, chosen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            length = last["length"]
            prompt = tokens // length
            rows = (tokens % length == last["index"].to(tokens.device)[prompt]).nonzero()[:, 0]
            if opening.perturbation is None:  # the first block of rows of this forward (a loop calls once per expert)
                grid = (len(last["index"]), experts.n_routed, experts.width)
                opening.values = torch.zeros(grid, dtype=values.dtype, device=values.device)
                opening.perturbation = torch.zeros(grid, dtype=values.dtype, device=values.device, requires_grad=True)
            where = (prompt[rows], chosen[rows])
            opening.values[where] = values[rows].detach()
            return values.index_put((rows,), values[rows] + opening.perturbation[where])

        return perturbed

    hooks = []
    for layer, site in enumerate(adapter.neuron_sites):
        experts = adapter.experts[layer]
        if experts is None:
            openings.append(_Opening(layer, 0))
            hooks.append(map_input(site, open_site(openings[-1])))
            continue
        openings.append(_Opening(layer, 0))
        hooks.append(expert_tap(experts.fused, open_experts(openings[-1], experts)))
        if experts.shared is not None:
            openings.append(_Opening(layer, experts.n_routed * experts.width))
            hooks.append(map_input(experts.shared, open_site(openings[-1])))
    device = adapter.input_device
    batches = list(length_sorted_batches(prompts, batch_size, max_batch_tokens))
    # Gradients even when called under inference_mode (which enable_grad alone does not undo) or no_grad.
    with frozen_parameters(adapter.model), attached(hooks), torch.inference_mode(False), torch.enable_grad():
        for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            # Left padding puts every prompt's last token in the final column: one logit row each.
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, "left")
            last["index"], last["length"] = last_token_index(mask), mask.shape[1]
            logits = adapter.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   position_ids=position_ids(mask).to(device), use_cache=False,
                                   logits_to_keep=1).logits[:, -1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            # Rows are independent (attention masks), so the gradient of the sum is each prompt's own.
            gradients = torch.autograd.grad(metric(logits, rows).sum(), [o.perturbation for o in openings])
            for opening, gradient in zip(openings, gradients, strict=True):
                gradient = gradient.detach().double().cpu().flatten(1)
                columns = slice(opening.offset, opening.offset + gradient.shape[1])
                consume(list(rows), opening.layer, columns, opening.values.double().cpu().flatten(1), gradient)
                opening.values = opening.perturbation = None


@dataclass
class _Opening:
    """One neuron site's zero perturbation at the last tokens (its gradient is dM/da) and the values there, for the
    batch in flight; `offset`: where its neurons start on the layer's axis."""

    layer: int
    offset: int
    values: torch.Tensor | None = None
    perturbation: torch.Tensor | None = None


def collect_gradients(
    adapter: ArchitectureAdapter,
    prompts: Sequence[Sequence[int]],
    metric: Metric,
    *,
    pad_token_id: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "attribution",
) -> GradientStatistics:
    """Stream sum a x dM/da and sum dM/da over `prompts`, for every neuron at the last prompt token (expert
    neurons included, as `_gradient_pass` opens them)."""
    n_layers, width = adapter.n_layers, adapter.neurons_per_layer
    with torch.inference_mode(False):  # not inference tensors, whatever mode the caller is in
        activation_gradient_sum = torch.zeros(n_layers, width, dtype=torch.float64)
        gradient_sum = torch.zeros(n_layers, width, dtype=torch.float64)

    def add(_rows: list[int], layer: int, columns: slice, value: torch.Tensor, gradient: torch.Tensor) -> None:
        activation_gradient_sum[layer, columns] += (value * gradient).sum(0)
        gradient_sum[layer, columns] += gradient.sum(0)

    _gradient_pass(adapter, prompts, metric, add, pad_token_id=pad_token_id, batch_size=batch_size,
                   max_batch_tokens=max_batch_tokens, progress=progress, desc=desc)
    return GradientStatistics(len(prompts), activation_gradient_sum, gradient_sum)


def collect_prompt_gradients(
    adapter: ArchitectureAdapter,
    prompts: Sequence[Sequence[int]],
    metric: Metric,
    neurons: torch.Tensor,
    *,
    pad_token_id: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = DISCOVERY_TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "attribution per prompt",
) -> tuple[torch.Tensor, torch.Tensor]:
    """a x dM/da and dM/da of the chosen `neurons` (flat ids, layer x neurons_per_layer + index) for each prompt:
    two [prompts, neurons] float64 tensors whose column sums are `collect_gradients`' sums for those neurons (what
    resampling needs)."""
    columns = columns_by_layer(neurons, adapter.neurons_per_layer)
    with torch.inference_mode(False):
        activation_gradient = torch.zeros(len(prompts), len(neurons), dtype=torch.float64)
        gradient = torch.zeros(len(prompts), len(neurons), dtype=torch.float64)

    def keep(rows: list[int], layer: int, block: slice, value: torch.Tensor, slope: torch.Tensor) -> None:
        if layer not in columns:
            return
        column, index = columns[layer]
        inside = (index >= block.start) & (index < block.stop)
        column, index = column[inside], index[inside] - block.start
        batch = torch.tensor(rows).unsqueeze(1)
        activation_gradient[batch, column] = value[:, index] * slope[:, index]
        gradient[batch, column] = slope[:, index]

    _gradient_pass(adapter, prompts, metric, keep, pad_token_id=pad_token_id, batch_size=batch_size,
                   max_batch_tokens=max_batch_tokens, progress=progress, desc=desc)
    return activation_gradient, gradient


# --- metrics ------------------------------------------------------------------------------------------------------

def first_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """The distinct first token of each text (as a response would start), in first-seen order."""
    ids: list[int] = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if encoded and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def refusal_log_odds(token_ids: Sequence[int]) -> Metric:
    """M = log p_R - log(1 - p_R), p_R the next-token probability of `token_ids`; both terms as log-sum-exps."""
    if not token_ids:
        raise ConfigError("method.refusal_starts: expected at least one refusal opening, got none")
    chosen = torch.tensor(sorted(set(token_ids)))

    def metric(logits: torch.Tensor, _rows: list[int]) -> torch.Tensor:
        is_refusal = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        is_refusal[chosen.to(logits.device)] = True
        refusal = logits.masked_fill(~is_refusal, float("-inf")).logsumexp(-1)
        other = logits.masked_fill(is_refusal, float("-inf")).logsumexp(-1)
        return refusal - other

    return metric


def target_logit_difference(targets: Sequence[int], counterfactuals: Sequence[int]) -> Metric:
    """M_i = logit(targets[i]) - logit(counterfactuals[i]) for prompt i."""
    target, counterfactual = torch.tensor(list(targets)), torch.tensor(list(counterfactuals))

    def metric(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        batch = torch.arange(len(rows), device=logits.device)
        chosen = torch.tensor(rows)
        return (logits[batch, target[chosen].to(logits.device)]
                - logits[batch, counterfactual[chosen].to(logits.device)])

    return metric


def prompt_targets(source: PromptSource, key: str) -> dict[str, str]:
    """prompt -> target token text for a prompt set whose rows carry a `target` field."""
    if source.packaged:
        rows = packaged_rows(source.packaged, source.subset)
        pairs = [(row["prompt"], row.get("target")) for row in rows]
    elif source.path and Path(source.path).expanduser().suffix.lower() in (".csv", ".json", ".jsonl"):
        try:
            pairs = list(zip(load_prompts(source), load_prompts(replace(source, column="target")), strict=True))
        except ConfigError:
            pairs = []
    else:
        pairs = []
    if not pairs or any(target is None for _, target in pairs):
        raise ConfigError(f"{key}: method.score=target needs a `target` for every prompt (as the packaged capitals "
                          "and sva sets have); this prompt set has none")
    return dict(pairs)


def target_metric(tokenizer, positive: Sequence[str], negative: Sequence[str],
                  sources: dict[str, PromptSource]) -> tuple[Metric, dict]:
    """The `target` metric over the positive prompts, and what identifies it (for the statistics cache key)."""
    if len(positive) != len(negative):
        raise ConfigError(f"prompts: method.score=target pairs positive prompt i with negative prompt i (whose target "
                          f"is the counterfactual), so the sets need equal sizes; got {len(positive)} and "
                          f"{len(negative)}")
    texts = {side: prompt_targets(sources[side], f"prompts.{side}") for side in ("positive", "negative")}
    targets = [first_tokens(tokenizer, [texts["positive"][p]])[0] for p in positive]
    counterfactuals = [first_tokens(tokenizer, [texts["negative"][p]])[0] for p in negative]
    same = [p for p, t, c in zip(positive, targets, counterfactuals, strict=True) if t == c]
    if same:
        raise ConfigError(f"prompts: the target and counterfactual of '{same[0]}' are the same token")
    return target_logit_difference(targets, counterfactuals), {"score": "target", "targets": targets,
                                                               "counterfactuals": counterfactuals}


# --- scores -------------------------------------------------------------------------------------------------------

def neuron_writes(adapter: ArchitectureAdapter, direction: torch.Tensor) -> torch.Tensor:
    """[layers, neurons] float64: <w_j, r> for the unit vector r along `direction`."""
    norm = direction.double().norm()
    if norm == 0:
        raise ConfigError("method.score=projection: the residual mean difference is zero at the direction layer")
    unit = direction.double() / norm
    if adapter.layout is None:
        return torch.stack([adapter.neuron_weights(layer).detach().double().cpu() @ unit
                            for layer in range(adapter.n_layers)])
    writes = torch.zeros(adapter.n_layers, adapter.neurons_per_layer, dtype=torch.float64)  # padding writes nothing
    for layer in range(adapter.n_layers):
        for offset, weights in adapter.write_views(layer):  # one expert at a time: no copy of a whole fused tensor
            writes[layer, offset : offset + weights.shape[0]] = weights.detach().double().cpu() @ unit
    return writes


def projection_scores(scores: NeuronScores, writes: torch.Tensor) -> NeuronScores:
    return replace(scores, name="projection", value=scores.delta * writes)


def attribution_scores(scores: NeuronScores, positive: GradientStatistics) -> NeuronScores:
    """mean over positive prompts of (a - negative mean) x dM/da."""
    patched = positive.activation_gradient_sum - scores.negative_mean * positive.gradient_sum
    return replace(scores, name="attribution", value=patched / positive.n_prompts)


def target_scores(scores: NeuronScores, positive: GradientStatistics) -> NeuronScores:
    """mean over positive prompts of a x dM/da."""
    return replace(scores, name="target", value=positive.activation_gradient_sum / positive.n_prompts)


def score_metric(score: str, tokenizer, *, refusal_starts: Sequence[str], positive: Sequence[str],
                 negative: Sequence[str], sources: dict[str, PromptSource]) -> tuple[Metric, dict]:
    """The metric M of a gradient score, and what identifies it (part of the statistics cache key)."""
    if score == "attribution":
        tokens = first_tokens(tokenizer, refusal_starts)
        return refusal_log_odds(tokens), {"score": score, "metric": "refusal_log_odds", "tokens": tokens}
    if score == "target":
        return target_metric(tokenizer, positive, negative, sources)
    raise ConfigError(f"method.score: expected one of {', '.join(GRADIENT_SCORES)} for a gradient score, got {score!r}")


def score_neurons(score: str, positive: ActivationStatistics, negative: ActivationStatistics,
                  adapter: ArchitectureAdapter, *, direction_layer: int,
                  gradients: GradientStatistics | None = None) -> NeuronScores:
    """The contrastive scores, ranked by `score` (delta, projection, attribution or target)."""
    scores = contrastive_scores(positive, negative)
    if score == "delta":
        return scores
    if score == "projection":
        if not 0 <= direction_layer < adapter.n_layers:
            raise ConfigError(f"method.direction_layer: expected a layer in [0, {adapter.n_layers}), "
                              f"got {direction_layer}")
        direction = positive.residual_mean[direction_layer] - negative.residual_mean[direction_layer]
        return projection_scores(scores, neuron_writes(adapter, direction))
    if score not in GRADIENT_SCORES:
        raise ConfigError(f"method.score: expected one of {', '.join(SCORES)}, got {score!r}")
    if gradients is None:
        raise ConfigError(f"method.score={score} needs the positive set's gradient statistics (collect_gradients)")
    return attribution_scores(scores, gradients) if score == "attribution" else target_scores(scores, gradients)
