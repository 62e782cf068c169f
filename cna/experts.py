"""Neurons inside mixture-of-experts blocks: where they are, how they are read and steered, how routing is redone.

In transformers 5 a MoE block keeps its routed experts fused in one module with 3-D parameters
(`gate_up_proj` [experts, 2 x width, hidden] and `down_proj` [experts, hidden, width]; gpt-oss stores both
transposed, with biases) and may run them through different kernels (`config._experts_implementation`: a loop
over experts, `batched_mm`, `grouped_mm`, ...). There is no per-expert `down_proj` module to hook, so:

- A *neuron* of a MoE layer is (expert, j): j a coordinate of that expert's `down_proj` input. Shared experts
  (Qwen2-MoE, DeepSeek-V3) are ordinary gated MLPs beside the routed ones; they are numbered after the routed
  experts. A layer's neurons sit on one axis, routed experts first (expert e at e x width), then the shared
  experts; `NeuronLayout` records where, and pads every layer to the widest (dense layers of hybrid models such
  as DeepSeek-V3's first layers keep their own width and have no experts).
- The capture/steer point is cna's own experts implementation, registered in transformers' experts interface
  (`TAPPED`): while a tap is attached (`attach_tap`, used only through `cna.hooks.attached`), the model's
  experts implementation is switched to it and back in `finally`. It runs the kernel the model had chosen and
  hands every block of expert rows to the taps between the gate and `down_proj`, with the expert and the token
  of each row: transformers' own `batched_mm` and `grouped_mm` kernels run unchanged (the taps wrap the
  expert's gate function), and the per-expert loop is the families' own eager loop with the tap inserted.
  With taps that change nothing (alpha = 0) the output is bit-identical to the kernel alone.
- A routed expert's neuron is, at a token, the value the expert computed if the router chose it, and 0
  otherwise: an expert that does not run writes nothing.
- `reroute` redoes a family's routing decision from (shifted) router logits: the router-level baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from cna.errors import CnaError
from cna.hooks import TAPS, Hook, read_input, read_output

# (values [rows, width], expert of each row [rows], token of each row [rows] in the flattened batch) -> new values
# or None (unchanged).
Tap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]

TAPPED = "cna_tapped"  # the name cna's implementation is registered under in transformers' ExpertsInterface
TAPPABLE = ("eager", "batched_mm", "grouped_mm")  # kernels whose rows cna can tell apart (every one that runs on CPU)


@dataclass(frozen=True)
class ExpertsSpec:
    """Where a family keeps its mixture-of-experts block, relative to a decoder layer."""

    fused: str = "mlp.experts"  # the fused experts module (3-D gate_up_proj, down_proj)
    router: str = "mlp.gate"  # returns (logits, weights, chosen experts)
    routing: str = "softmax_topk"  # how the router turns logits into its choice: a key of ROUTINGS
    shared: str | None = None  # the shared expert's down_proj (an nn.Linear): its input is the shared neurons
    # An expert's down_proj in per-expert checkpoints (what transformers 5 converts from on load, and writes back
    # on save), relative to the layer; None where checkpoints store the fused tensor (gpt-oss).
    checkpoint_down: str | None = "mlp.experts.{expert}.down_proj.weight"


# --- where the neurons are --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeuronBlock:
    """One expert's neurons (or a dense layer's) on its layer's neuron axis."""

    expert: int | None  # routed experts 0..E-1, shared experts E, E+1, ...; None: the MLP of a dense layer
    offset: int
    width: int
    shared: bool = False


@dataclass(frozen=True)
class NeuronLayout:
    """Per layer, `{"dense": width}` or `{"experts": E, "width": I, "shared": [S, ...]}`; the axis is padded to
    the widest layer (`width`). A plain value: it goes into statistics files and circuit.json."""

    layers: tuple[dict, ...]

    @cached_property
    def blocks(self) -> list[list[NeuronBlock]]:
        blocks = []
        for spec in self.layers:
            if "dense" in spec:
                blocks.append([NeuronBlock(None, 0, spec["dense"])])
                continue
            routed, width = spec["experts"], spec["width"]
            layer = [NeuronBlock(e, e * width, width) for e in range(routed)]
            offset = routed * width
            for i, shared in enumerate(spec["shared"]):
                layer.append(NeuronBlock(routed + i, offset, shared, shared=True))
                offset += shared
            blocks.append(layer)
        return blocks

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_width(self, layer: int) -> int:
        spec = self.layers[layer]
        return spec["dense"] if "dense" in spec else spec["experts"] * spec["width"] + sum(spec["shared"])

    @property
    def width(self) -> int:
        return max(self.layer_width(layer) for layer in range(self.n_layers))

    @property
    def total(self) -> int:
        """Every neuron: dense, routed and shared (what k fractions count)."""
        return sum(self.layer_width(layer) for layer in range(self.n_layers))

    @property
    def n_routed(self) -> int:
        return max((spec.get("experts", 0) for spec in self.layers), default=0)

    @property
    def padded(self) -> bool:
        return any(self.layer_width(layer) != self.width for layer in range(self.n_layers))

    def valid(self) -> torch.Tensor:
        """Bool [layers, width]: True for real neurons, False for padding."""
        mask = torch.zeros(self.n_layers, self.width, dtype=torch.bool)
        for layer in range(self.n_layers):
            mask[layer, : self.layer_width(layer)] = True
        return mask

    def locate(self, layer: int, flat: int) -> tuple[int | None, int]:
        """(expert, index within the expert) of position `flat` on the layer's axis."""
        for block in self.blocks[layer]:
            if block.offset <= flat < block.offset + block.width:
                return block.expert, flat - block.offset
        raise CnaError(f"position {flat} of layer {layer} is padding, not a neuron")

    def block(self, layer: int, expert: int | None) -> NeuronBlock:
        for block in self.blocks[layer]:
            if block.expert == expert:
                return block
        raise CnaError(f"layer {layer} has no expert {expert} (its neurons: {self.layers[layer]})")

    def flat(self, layer: int, expert: int | None, index: int) -> int:
        block = self.block(layer, expert)
        if not 0 <= index < block.width:
            raise CnaError(f"neuron {index} of layer {layer} expert {expert}: expected an index in [0, {block.width})")
        return block.offset + index

    def to_dict(self) -> dict:
        return {"layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict) -> NeuronLayout:
        return cls(tuple({k: (list(v) if isinstance(v, list) else v) for k, v in spec.items()}
                         for spec in data["layers"]))


@dataclass
class LayerExperts:
    """The modules of one MoE layer."""

    block: nn.Module  # the whole MoE block: its output is what the layer's MLP adds to the residual stream
    fused: nn.Module
    router: nn.Module
    shared: nn.Module | None  # the shared expert's down_proj
    spec: ExpertsSpec

    @property
    def n_routed(self) -> int:
        return int(self.fused.num_experts)

    @property
    def width(self) -> int:
        """Neurons per routed expert: the input width of its down_proj."""
        down = self.fused.down_proj
        return int(down.shape[1] if self.fused.is_transposed else down.shape[2])

    @property
    def shared_widths(self) -> list[int]:
        return [] if self.shared is None else [int(self.shared.in_features)]

    def down_view(self, expert: int) -> torch.Tensor:
        """[width, hidden]: row j is what neuron j of routed expert `expert` writes (a view of the fused weight)."""
        down = self.fused.down_proj[expert]
        return down if self.fused.is_transposed else down.t()


def find_experts(layer: nn.Module, spec: ExpertsSpec) -> LayerExperts | None:
    """The layer's MoE modules, or None for a dense layer (no fused experts module there)."""
    try:
        fused = layer.get_submodule(spec.fused)
    except AttributeError:
        return None
    down = getattr(fused, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3 or not hasattr(fused, "is_transposed"):
        raise CnaError(f"{type(fused).__name__} keeps no 3-D down_proj that cna can read (a quantised experts "
                       "kernel such as MXFP4?); load the model dequantised, in bfloat16")
    if not getattr(fused, "has_gate", True):
        raise CnaError(f"{type(fused).__name__} has ungated experts, which cna does not support")
    block = layer.get_submodule(spec.fused.rsplit(".", 1)[0])
    shared = layer.get_submodule(spec.shared) if spec.shared else None
    return LayerExperts(block, fused, layer.get_submodule(spec.router), shared, spec)


def layer_spec(experts: LayerExperts | None, dense_width: int | None) -> dict:
    if experts is None:
        return {"dense": int(dense_width)}
    return {"experts": experts.n_routed, "width": experts.width, "shared": experts.shared_widths}


# --- the tap: cna's experts implementation ----------------------------------------------------------------------

_SWITCHED: dict[int, list] = {}  # id(config) -> [config, the implementation it had, taps attached]


class TapHandle:
    def __init__(self, fused: nn.Module, tap: Tap):
        self.fused, self.tap = fused, tap

    def remove(self) -> None:
        taps = TAPS.get(self.fused, [])
        if self.tap in taps:
            taps.remove(self.tap)
            entry = _SWITCHED[id(self.fused.config)]
            entry[2] -= 1
            if entry[2] == 0:
                entry[0]._experts_implementation = entry[1]
                del _SWITCHED[id(self.fused.config)]


def attach_tap(fused: nn.Module, tap: Tap) -> TapHandle:
    """Call `tap` with every block of expert rows between the gate and down_proj of `fused`, until removed.

    The first tap on a model switches its experts implementation to cna's (which runs the one it had); the
    last one removed switches it back.
    """
    _register()
    config = fused.config
    entry = _SWITCHED.get(id(config))
    if entry is None:
        current = config._experts_implementation or "eager"
        if current not in TAPPABLE:
            raise CnaError(f"experts implementation '{current}' cannot be read or steered neuron by neuron; load the "
                           f"model with one of {', '.join(TAPPABLE)} (experts_implementation=...)")
        entry = _SWITCHED[id(config)] = [config, config._experts_implementation, 0]
        config._experts_implementation = TAPPED
    entry[2] += 1
    TAPS.setdefault(fused, []).append(tap)
    return TapHandle(fused, tap)


def expert_tap(fused: nn.Module, tap: Tap) -> Hook:
    """A hook for `cna.hooks.attached` that runs `tap` inside `fused` (see `attach_tap`)."""
    return Hook(fused, tap, pre=True, attach=attach_tap)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if TAPPED not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(TAPPED, _tapped_forward)


def _tapped_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts forward with taps: the implementation the model had, rows handed to the taps before down_proj."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    inner = _SWITCHED[id(self.config)][1] or "eager"
    taps = list(TAPS.get(self, ()))
    if not taps:
        kernel = type(self).forward.__wrapped__ if inner == "eager" else ALL_EXPERTS_FUNCTIONS[inner]
        return kernel(self, hidden_states, top_k_index, top_k_weights)

    def tap(values: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        for each in taps:
            changed = each(values, experts, tokens)
            values = values if changed is None else changed
        return values

    if inner == "eager":
        return _expert_loop(self, hidden_states, top_k_index, top_k_weights, tap)
    experts, tokens = _row_order(inner, top_k_index)
    return ALL_EXPERTS_FUNCTIONS[inner](_GateTap(self, lambda values: tap(values, experts, tokens)),
                                        hidden_states, top_k_index, top_k_weights)


def _row_order(kernel: str, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert and token of each row the kernel computes: batched_mm keeps the (token, choice) order,
    grouped_mm sorts the pairs by expert (the same sort call on the same tensor gives the same order)."""
    flat = top_k_index.reshape(-1)
    choices = top_k_index.shape[-1]
    if kernel == "batched_mm":
        return flat, torch.arange(flat.numel(), device=flat.device) // choices
    experts, order = torch.sort(flat)
    return experts, order // choices


class _GateTap:
    """The experts module as a kernel sees it, with the taps after its gate (`_apply_gate`)."""

    def __init__(self, experts: nn.Module, after_gate: Callable[[torch.Tensor], torch.Tensor]):
        self._experts, self._after_gate = experts, after_gate

    def __getattr__(self, name: str):
        return getattr(self._experts, name)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._after_gate(self._experts._apply_gate(gate_up))


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def _expert_loop(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, tap: Callable) -> torch.Tensor:
    """The families' eager loop over the experts that were chosen, op for op, with the tap before down_proj."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    bias = getattr(self, "has_bias", False)
    for expert in hit[:, 0]:
        if expert == self.num_experts:
            continue
        choice, token = torch.where(mask[expert])
        gate_up = _project(hidden_states[token], self.gate_up_proj[expert],
                           self.gate_up_proj_bias[expert] if bias else None, self.is_transposed)
        values = tap(self._apply_gate(gate_up), expert.expand(token.shape[0]), token)
        out = _project(values, self.down_proj[expert], self.down_proj_bias[expert] if bias else None,
                       self.is_transposed)
        out = out * top_k_weights[token, choice, None]
        final.index_add_(0, token, out.to(final.dtype))
    return final


# --- routing, redone from shifted logits (the router baseline) -------------------------------------------------

def _softmax_topk(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax in float32, top k, optionally renormalised, in the logits' dtype."""
    probabilities = F.softmax(logits, dtype=torch.float, dim=-1)
    weights, chosen = torch.topk(probabilities, router.top_k, dim=-1)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), chosen


def _mixtral(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral: softmax in float32, top k, renormalised, weights left in float32."""
    probabilities = F.softmax(logits.float(), dim=-1)
    weights, chosen = torch.topk(probabilities, router.top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def _topk_softmax(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top k of the logits, softmax over those k."""
    top, chosen = torch.topk(logits, router.top_k, dim=-1)
    return F.softmax(top, dim=1, dtype=top.dtype), chosen


def _grouped_sigmoid(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores plus a correction bias choose the top groups, then the top k experts in them;
    the weights are the uncorrected scores, optionally renormalised, times the routed scaling factor."""
    scores = logits.sigmoid()
    for_choice = scores + router.e_score_correction_bias
    groups = router.num_group
    group_scores = for_choice.view(-1, groups, router.num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_index = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_index, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, router.num_experts // groups).reshape(
        -1, router.num_experts)
    for_choice = for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    chosen = torch.topk(for_choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, chosen)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * router.routed_scaling_factor, chosen


ROUTINGS: dict[str, Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax_topk": _softmax_topk, "mixtral": _mixtral, "topk_softmax": _topk_softmax,
    "grouped_sigmoid": _grouped_sigmoid,
}


def reroute(experts: LayerExperts, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, chosen experts) the layer's router returns for these logits: its own rule, op for op."""
    return ROUTINGS[experts.spec.routing](experts.router, logits)


# --- discovery: each prompt's neurons inside the experts ---------------------------------------------------------

class ExpertReadout:
    """Discovery in MoE layers: at each prompt's position (its last real token, or the mean over its real tokens)
    the value each routed expert's neurons computed there, 0 where the router did not choose the expert, the shared
    experts' neurons as a dense layer's, and which experts were chosen. Handed to `deliver(layer, values [B, layer
    width] float32, chosen [B, routed experts] float32)` when the layer's MoE block finishes; one buffer serves
    every layer, so memory is batch x the widest layer, whatever the number of experts."""

    def __init__(self, layers: list[LayerExperts | None], batch: dict, position: str, batch_size: int,
                 prompt_values: Callable[[torch.Tensor], torch.Tensor],
                 deliver: Callable[[int, torch.Tensor, torch.Tensor], None], device: torch.device):
        self.layers, self.batch, self.position = layers, batch, position
        self.prompt_values, self.deliver, self.device = prompt_values, deliver, device
        moe = [experts for experts in layers if experts is not None]
        widest = max(e.n_routed * e.width + sum(e.shared_widths) for e in moe)
        self.values = torch.zeros(batch_size, widest, device=device)
        self.chosen = torch.zeros(batch_size, max(e.n_routed for e in moe), device=device)

    def hooks(self) -> list:
        hooks = []
        for layer, experts in enumerate(self.layers):
            if experts is None:
                continue
            hooks.append(expert_tap(experts.fused, self._routed(experts)))
            if experts.shared is not None:
                hooks.append(read_input(experts.shared, self._shared(experts)))
            hooks.append(read_output(experts.block, self._finish(layer, experts)))
        return hooks

    def _routed(self, experts: LayerExperts) -> Tap:
        routed_width = experts.n_routed * experts.width

        def read(values: torch.Tensor, chosen: torch.Tensor, tokens: torch.Tensor) -> None:
            length = self.batch["mask"].shape[1]
            prompt, place = tokens // length, tokens % length
            if self.position == "last":
                kept = place == self.batch["last"].to(tokens.device)[prompt]
            else:  # rows at padding are selected away, never multiplied by 0 (padding may hold NaN)
                kept = self.batch["mask"].to(tokens.device, torch.bool)[prompt, place]
            rows = kept.nonzero()[:, 0]
            where = (prompt[rows].to(self.device), chosen[rows].to(self.device))
            grid = self.values[:, :routed_width].view(len(self.values), experts.n_routed, experts.width)
            grid.index_put_(where, values[rows].float().to(self.device), accumulate=True)
            self.chosen.index_put_(where, torch.ones(len(rows), device=self.device), accumulate=True)

        return read

    def _shared(self, experts: LayerExperts) -> Callable[[torch.Tensor], None]:
        start = experts.n_routed * experts.width

        def read(hidden: torch.Tensor) -> None:
            # Qwen2-MoE runs its shared expert on the flattened tokens [B x T, width]
            values = self.prompt_values(hidden.reshape(*self.batch["mask"].shape, -1)).to(self.device)
            self.values[: len(values), start : start + values.shape[-1]] = values

        return read

    def _finish(self, layer: int, experts: LayerExperts) -> Callable[[torch.Tensor], None]:
        routed_width = experts.n_routed * experts.width
        width = routed_width + sum(experts.shared_widths)

        def finish(_output: torch.Tensor) -> None:
            rows = self.batch["mask"].shape[0]
            values, chosen = self.values[:rows, :width], self.chosen[:rows, : experts.n_routed]
            if self.position == "mean":  # sums over the real tokens so far: the mean, as the shared experts'
                real = self.batch["mask"].to(self.device).sum(1, keepdim=True).float()
                values[:, :routed_width] /= real
                chosen /= real
            self.deliver(layer, values, chosen)
            self.values[:rows].zero_()
            self.chosen[:rows].zero_()

        return finish
