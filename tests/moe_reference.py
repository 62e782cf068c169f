"""Test helpers for mixtures of experts: a planted expert neuron, and discovery's statistics recomputed by a plain
loop that routes every token explicitly from the weights (no cna code on the expert path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cna.batching import last_token_index, pad_batch, position_ids
from cna.hooks import attached, read_input
from cna.models import ArchitectureAdapter
from cna.tiny import HIDDEN, VOCAB, tiny_moe
from conftest import random_prompts

TRIGGER = 7  # the token that reaches the planted neuron


@dataclass
class PlantedMoe:
    model: torch.nn.Module
    adapter: ArchitectureAdapter
    neuron: tuple[int, int, int]  # (layer, expert, index)

    def prompts(self, n: int, seed: int, trigger: bool) -> list[list[int]]:
        """Random prompts without the trigger; the positive ones end with it."""
        plain = [t for t in range(10, VOCAB) if t != TRIGGER]
        prompts = [[t if t != TRIGGER else 11 for t in p] for p in random_prompts(n, seed, high=16)]
        return [p[:-1] + [TRIGGER if trigger else plain[(seed + i) % len(plain)]] for i, p in enumerate(prompts)]


def planted_moe(family: str, layer: int = 2, expert: int = 5, index: int = 7) -> PlantedMoe:
    """A tiny MoE whose neuron (layer, expert, index) fires on the trigger token, through its weights only.

    A unit direction u of the embedding space: no token carries any u but the trigger (10 u). The router of `layer`
    reads u for `expert` (so the trigger is routed there), and the neuron's gate and up rows read u; its value on
    the trigger is about silu(4) x 4, elsewhere the expert rarely runs and the neuron stays near 0.
    """
    model = tiny_moe(family, seed=1)
    adapter = ArchitectureAdapter(model)
    experts = adapter.experts[layer]
    u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2))
    u /= u.norm()
    fused = experts.fused
    gate, up = (2 * index, 2 * index + 1) if not fused.is_concatenated else (index, experts.width + index)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding -= (embedding @ u).unsqueeze(-1) * u
        embedding[TRIGGER] += 10 * u
        experts.router.weight[expert] = 5 * u
        weights = fused.gate_up_proj[expert]
        for row in (gate, up):
            if fused.is_transposed:
                weights[:, row] = 0.5 * u
            else:
                weights[row] = 0.5 * u
    return PlantedMoe(model, adapter, (layer, expert, index))


def explicit_route(adapter: ArchitectureAdapter, layer: int, h: torch.Tensor) -> list[int]:
    """The experts a token goes to, from the router's weights: the top k logits (softmax and gpt-oss routers keep
    the logits' order), or DeepSeek-V3's rule (the best groups by their top-2 corrected sigmoid scores, then the top
    k experts inside them)."""
    router = adapter.experts[layer].router
    logits = F.linear(h.float(), router.weight.float(), getattr(router, "bias", None))
    if adapter.model_type != "deepseek_v3":
        return torch.topk(logits, router.top_k).indices.tolist()
    scores = logits.sigmoid() + router.e_score_correction_bias
    groups = scores.view(router.num_group, -1)
    best = torch.topk(groups.topk(2).values.sum(-1), router.topk_group).indices
    allowed = torch.full_like(groups, float("-inf"))
    allowed[best] = groups[best]
    return torch.topk(allowed.flatten(), router.top_k).indices.tolist()


def expert_values(adapter: ArchitectureAdapter, layer: int, expert: int, h: torch.Tensor) -> torch.Tensor:
    """One expert's neurons at one token, from its weights: silu(gate) x up; gpt-oss: interleaved gate and up,
    clamped, (up + 1) x gate x sigmoid(1.702 gate), with biases."""
    experts = adapter.experts[layer]
    fused = experts.fused
    if expert >= experts.n_routed:  # the shared expert: an ordinary gated MLP
        mlp = adapter.layers[layer].get_submodule(adapter.family.experts.shared.rsplit(".", 1)[0])
        return F.silu(mlp.gate_proj.weight @ h) * (mlp.up_proj.weight @ h)
    if fused.is_transposed:
        gate_up = h @ fused.gate_up_proj[expert] + fused.gate_up_proj_bias[expert]
        gate, up = gate_up[::2].clamp(max=fused.limit), gate_up[1::2].clamp(-fused.limit, fused.limit)
        return (up + 1) * gate * torch.sigmoid(gate * fused.alpha)
    gate, up = (fused.gate_up_proj[expert] @ h).chunk(2)
    return F.silu(gate) * up


def reference_statistics(adapter: ArchitectureAdapter, prompts: list[list[int]],
                         position: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(neuron sums [layers, width], routing counts [layers, routed]) in float64, one prompt and one token at a
    time: routed experts' neurons where the explicit route chose them, 0 elsewhere; shared and dense neurons always."""
    ids, mask = pad_batch(prompts, 0, "left")
    inputs: dict[int, torch.Tensor] = {}
    hooks = [read_input(layer.get_submodule("mlp"), lambda x, i=i: inputs.__setitem__(i, x.detach().clone()))
             for i, layer in enumerate(adapter.layers)]
    with attached(hooks), torch.inference_mode():
        adapter.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    layout = adapter.layout
    sums = torch.zeros(adapter.n_layers, layout.width, dtype=torch.float64)
    routing = torch.zeros(adapter.n_layers, layout.n_routed, dtype=torch.float64)
    last = last_token_index(mask)
    for b in range(len(prompts)):
        tokens = [int(last[b])] if position == "last" else mask[b].nonzero()[:, 0].tolist()
        for layer, experts in enumerate(adapter.experts):
            vector = torch.zeros(layout.width, dtype=torch.float64)
            chosen = torch.zeros(layout.n_routed, dtype=torch.float64)
            for t in tokens:
                h = inputs[layer][b, t]
                if experts is None:  # a dense layer
                    mlp = adapter.layers[layer].mlp
                    dense = F.silu(mlp.gate_proj.weight @ h) * (mlp.up_proj.weight @ h)
                    vector[: dense.shape[0]] += dense.double()
                    continue
                for block in layout.blocks[layer]:
                    if block.shared or block.expert in explicit_route(adapter, layer, h):
                        values = expert_values(adapter, layer, block.expert, h).double()
                        vector[block.offset : block.offset + block.width] += values
                        if not block.shared:
                            chosen[block.expert] += 1
            sums[layer] += vector / len(tokens)
            routing[layer] += chosen / len(tokens)
    return sums, routing
