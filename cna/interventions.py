"""Interventions: one protocol, a context manager taking a strength alpha in [0, 1].

    with intervention.steer(alpha=0.5):
        model.generate(...)

alpha = 0 leaves the model bit-identical (the hooks run, their arithmetic is
exact at 0); alpha = 1 is full strength; the hooks are removed on leaving the
block, exception or not.

- `NeuronScale` (CNA): the circuit's neurons become m * x + (1 - m) * c, with
  m = 1 - alpha (or an explicit multiplier, m > 1 amplifies) and c = 0 in
  `scale` mode, the neuron's negative-set mean in `mean` mode. An expert's
  neuron is changed wherever its expert runs (inside the fused experts, `cna.experts`).
  The random control is `NeuronScale` on `cna.discovery.random_circuit`: as many
  neurons per layer as a given circuit, drawn with a seed.
- `SteeringVector` (CAA, Rimsky et al. 2024): subtracts alpha * scale * v from
  the residual stream after one layer, v = mean(positive) - mean(negative) there.
- `DirectionAblation` (Arditi et al. 2024): removes alpha times the projection on
  the unit mean-difference direction from everything written to the residual
  stream (the embeddings, every attention block's output and every MLP block's
  output), so no block reads it; the same as the weight-orthogonalised model
  (`cna.export.orthogonalised_weights`).
- `RouterBias` (mixtures of experts, neuron-free): chosen experts' gate logits
  move by alpha x shift before the router decides (shift < 0 suppresses an
  expert, > 0 boosts it); the router's own rule then picks the experts and
  their weights from the shifted logits.

`positions` picks where an intervention acts during generation: `all` tokens,
the `prompt` only (the prefill pass) or `generated` tokens only (later passes).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace

import torch

from cna.circuit import Circuit, ExpertChoice, ResidualDirection
from cna.errors import CnaError, ConfigError
from cna.experts import expert_tap, reroute
from cna.export import baked_weights as baked_weights  # re-exported: steering and its baked form
from cna.export import export_baked_model as export_baked_model
from cna.export import export_orthogonalised_model as export_orthogonalised_model
from cna.hooks import Hook, TensorMap, attached, map_input, map_output
from cna.models import ArchitectureAdapter, is_offloaded, is_quantized_module

POSITIONS = ("all", "prompt", "generated")
NEURON_MODES = ("scale", "mean")


def check_alpha(alpha: float) -> float:
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)


class _DeviceCache:
    """A float32 tensor kept once per device it is needed on: layers may sit on several GPUs.

    Hooks compute in float32 and round once to the activation's dtype: a factor cast to
    bfloat16 first would be off by up to 0.4% (0.3 becomes 0.30078125) and disagree with
    the baked export, which scales its weights in float32 too.
    """

    def __init__(self, value: torch.Tensor):
        self.value = value.float()
        self._copies: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self.value.to(device)
        return self._copies[device]


def _in_float32(compute: TensorMap) -> TensorMap:
    """Apply `compute` to the activation in float32, then round once to its own dtype."""
    return lambda x: compute(x.float()).to(x.dtype)


class Intervention(ABC):
    def __init__(self, adapter: ArchitectureAdapter, positions: str = "all"):
        if positions not in POSITIONS:
            raise ConfigError(f"positions '{positions}' is not one of {POSITIONS}")
        self.adapter = adapter
        self.positions = positions

    def steer(self, alpha: float):
        """Context manager: the model is steered with strength `alpha` inside the block."""
        return self._attached(self.hooks(check_alpha(alpha)))

    @abstractmethod
    def hooks(self, alpha: float) -> list[Hook]:
        """The hooks that apply this intervention at strength alpha."""

    def multiply(self, multiplier: float):
        """Context manager: the strength as a multiplier m = 1 - alpha; m > 1 (alpha < 0) reverses the intervention
        and amplifies what it removes: CAA adds its vector, directional ablation scales the projection by m."""
        if multiplier < 0:
            raise ConfigError(f"multiplier must be >= 0, got {multiplier}")
        return self._attached(self.hooks(1.0 - float(multiplier)))

    def hooks_at(self, alpha: float, multiplier: float | None = None) -> list[Hook]:
        """The hooks `steer(alpha)` (or `multiply(multiplier)`) attaches at every position, for an engine that
        attaches them itself."""
        return self.hooks(check_alpha(alpha if multiplier is None else 1.0 - multiplier))

    def on(self, adapter) -> Intervention:
        """The same intervention on another copy of the model: an engine's (cna.engines), whose adapter names the
        same layers, neuron sites and residual writers in its own modules."""
        if (adapter.n_layers, adapter.neurons_per_layer) != (self.adapter.n_layers, self.adapter.neurons_per_layer):
            raise ConfigError(f"the engine's model has {adapter.n_layers} x {adapter.neurons_per_layer} neurons, "
                              f"the intervention's {self.adapter.n_layers} x {self.adapter.neurons_per_layer}")
        moved = copy.copy(self)
        moved.adapter = adapter
        return moved

    def first_steered_layer(self) -> int | None:
        """The lowest decoder layer whose computation it changes (layers below run as unsteered: prefix reuse);
        None where it changes every layer."""
        return None

    def baked(self, multiplier: float) -> AbstractContextManager | None:
        """A context in which the model's weights carry the intervention at `multiplier` (restored on leaving),
        or None where weights cannot carry it."""
        return None

    @contextmanager
    def _attached(self, hooks: list[Hook]) -> Iterator[None]:
        if self.positions == "all":
            with attached(hooks):
                yield
            return
        prefill = {"now": True}

        def note_pass(_module, args, kwargs):
            prefill["now"] = is_prompt_pass(args, kwargs)

        want_prefill = self.positions == "prompt"
        gated = [replace(h, fn=_gate(h.fn, lambda: prefill["now"] == want_prefill))
                 for h in hooks]
        with attached([Hook(self.adapter.model, note_pass, pre=True, with_kwargs=True), *gated]):
            yield


def is_prompt_pass(args: tuple, kwargs: dict) -> bool:
    """Whether a model forward processes prompt tokens (the prefill) rather than one generated token.

    Told from the inputs alone, whatever the cache's keyword is called (transformers 5.25 renamed
    `past_key_values` to `cache`; `cache_position` is gone): a pass is the prompt's when its KV cache is
    absent or still empty, or when it carries more than one new position (a prompt continued in chunks).
    """
    caches = (value for value in (*args, *kwargs.values()) if callable(getattr(value, "get_seq_length", None)))
    cache = next(caches, None)
    return cache is None or cache.get_seq_length() == 0 or _new_positions(args, kwargs) > 1


def _new_positions(args: tuple, kwargs: dict) -> int:
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds")
    return 1 if tokens is None else int(tokens.shape[1])


def _gate(fn: Callable, active: Callable[[], bool]) -> Callable:
    """A hook that runs `fn` only while `active()`; returning None leaves inputs/outputs unchanged."""

    def hook(*args):
        return fn(*args) if active() else None

    return hook


class NeuronScale(Intervention):
    """CNA: scale the circuit's neurons by m = 1 - alpha (or toward their negative-set mean)."""

    def __init__(self, adapter: ArchitectureAdapter, circuit: Circuit, *, mode: str = "scale",
                 positions: str = "all"):
        super().__init__(adapter, positions)
        if mode not in NEURON_MODES:
            raise ConfigError(f"mode '{mode}' is not one of {NEURON_MODES}")
        if circuit.n_layers != adapter.n_layers or circuit.neurons_per_layer != adapter.neurons_per_layer:
            raise ConfigError(
                f"circuit is for {circuit.n_layers} x {circuit.neurons_per_layer} neurons, "
                f"model has {adapter.n_layers} x {adapter.neurons_per_layer}"
            )
        self.circuit = circuit
        self.mode = mode
        groups: dict[tuple[int, int | None], list] = {}  # (layer, expert): its neurons; expert None: a dense layer
        for neuron in circuit.neurons:
            groups.setdefault((neuron.layer, neuron.expert), []).append(neuron)
        _check_experts(adapter, groups)
        self._groups = {
            key: (torch.tensor([n.index for n in neurons]),
                  torch.tensor([n.negative_mean if mode == "mean" else 0.0 for n in neurons], dtype=torch.float64))
            for key, neurons in groups.items()
        }

    def hooks(self, alpha: float) -> list[Hook]:
        return self._scale_hooks(1.0 - alpha)

    def multiply(self, multiplier: float):
        """Context manager: neurons become m * x + (1 - m) * c; m = 0 ablates, 1 is unchanged, > 1 amplifies."""
        if multiplier < 0:
            raise ConfigError(f"multiplier must be >= 0, got {multiplier}")
        return self._attached(self._scale_hooks(float(multiplier)))

    def hooks_at(self, alpha: float, multiplier: float | None = None) -> list[Hook]:
        if multiplier is None:
            return self.hooks(check_alpha(alpha))
        if multiplier < 0:
            raise ConfigError(f"multiplier must be >= 0, got {multiplier}")
        return self._scale_hooks(float(multiplier))

    def first_steered_layer(self) -> int | None:
        return min(self.circuit.by_layer())

    def baked(self, multiplier: float) -> AbstractContextManager | None:
        """Scale mode at every position, in circuit layers held in memory at full precision: the multipliers
        written into `down_proj` (cna.export.baked_weights)."""
        if self.mode != "scale" or self.positions != "all":
            return None
        sites = [self.adapter.neuron_sites[layer] for layer in self.circuit.by_layer()]
        if any(is_quantized_module(site) or is_offloaded(site) for site in sites):
            return None
        return baked_weights(self.adapter, self.circuit, multiplier)

    def _scale_hooks(self, multiplier: float) -> list[Hook]:
        hooks, routed = [], {}
        for (layer, expert), (indices, centres) in self._groups.items():
            experts = self.adapter.experts[layer]
            if experts is not None and expert < experts.n_routed:
                routed.setdefault(layer, []).append((expert, indices, centres))
                continue
            site, width = self._site(layer, expert)
            factor = torch.ones(width, dtype=torch.float64)
            factor[indices] = multiplier
            factors = _DeviceCache(factor)
            if self.mode == "scale":
                hooks.append(map_input(site, _in_float32(lambda x, f=factors: x * f.on(x.device))))
                continue
            offset = torch.zeros(width, dtype=torch.float64)
            offset[indices] = (1.0 - multiplier) * centres
            offsets = _DeviceCache(offset)
            hooks.append(map_input(site, _in_float32(lambda x, f=factors, o=offsets: x * f.on(x.device)
                                                     + o.on(x.device))))
        return hooks + [self._routed_hook(layer, groups, multiplier) for layer, groups in routed.items()]

    def _site(self, layer: int, expert: int | None):
        """The module whose input holds a dense layer's neurons or a shared expert's, and its width."""
        experts = self.adapter.experts[layer]
        if experts is not None:
            return experts.shared, experts.shared_widths[0]
        layout = self.adapter.layout
        return self.adapter.neuron_sites[layer], layout.layer_width(layer) if layout else self.adapter.neurons_per_layer

    def _routed_hook(self, layer: int, groups: list, multiplier: float) -> Hook:
        """A tap inside the fused experts: every row an expert computes is scaled by that expert's factors."""
        experts = self.adapter.experts[layer]
        factor = torch.ones(experts.n_routed, experts.width, dtype=torch.float64)
        offset = torch.zeros(experts.n_routed, experts.width, dtype=torch.float64)
        for expert, indices, centres in groups:
            factor[expert, indices] = multiplier
            offset[expert, indices] = (1.0 - multiplier) * centres
        factors, offsets = _DeviceCache(factor), _DeviceCache(offset)

        def scale(values: torch.Tensor, chosen: torch.Tensor, _tokens: torch.Tensor) -> torch.Tensor:
            steered = values.float() * factors.on(values.device)[chosen]
            if self.mode == "mean":
                steered = steered + offsets.on(values.device)[chosen]
            return steered.to(values.dtype)

        return expert_tap(experts.fused, scale)


def _check_experts(adapter: ArchitectureAdapter, groups: dict) -> None:
    """Every (layer, expert) of a circuit exists in the model: dense neurons in dense layers, experts in MoE layers."""
    for (layer, expert), neurons in groups.items():
        if adapter.layout is None:
            if expert is not None:
                raise ConfigError(f"circuit neuron ({layer}, expert {expert}) is an expert's, but {adapter.model_type} "
                                  "has no experts")
            continue
        try:
            for neuron in neurons:
                adapter.layout.flat(layer, expert, neuron.index)
        except CnaError as error:
            raise ConfigError(f"circuit does not fit the model: {error}") from error


class RouterBias(Intervention):
    """The router baseline: chosen experts' gate logits shifted by alpha x shift, then routed by the router's rule.

    No neuron is touched: the experts that run (and their weights) change. alpha = 0 shifts nothing and the rule
    is redone op for op, so the model is bit-identical.
    """

    def __init__(self, adapter: ArchitectureAdapter, choice: ExpertChoice, *, positions: str = "all"):
        super().__init__(adapter, positions)
        if not adapter.has_experts:
            raise ConfigError(f"method router: model_type '{adapter.model_type}' has no routed experts")
        self.choice = choice
        self._shifts: dict[int, torch.Tensor] = {}
        for layer, entries in choice.by_layer().items():
            experts = adapter.experts[layer] if 0 <= layer < adapter.n_layers else None
            if experts is None:
                raise ConfigError(f"method router: layer {layer} has no routed experts")
            shift = torch.zeros(experts.n_routed, dtype=torch.float64)
            for entry in entries:
                if not 0 <= entry["expert"] < experts.n_routed:
                    raise ConfigError(f"method router: layer {layer} has no expert {entry['expert']}")
                shift[entry["expert"]] = entry["shift"]
            self._shifts[layer] = shift

    def first_steered_layer(self) -> int | None:
        return min(self._shifts)  # routing changes inside layer L's MoE block

    def hooks(self, alpha: float) -> list[Hook]:
        hooks = []
        for layer, shift in self._shifts.items():
            experts = self.adapter.experts[layer]
            offsets = _DeviceCache(alpha * shift)

            def rerouted(_module, _args, output, experts=experts, offsets=offsets):
                logits = output[0]
                shifted = (logits.float() + offsets.on(logits.device)).to(logits.dtype)
                weights, chosen = reroute(experts, shifted)
                return (shifted, weights, chosen, *output[3:])

            hooks.append(Hook(experts.router, rerouted, pre=False))
        return hooks


class SteeringVector(Intervention):
    """CAA: subtract alpha * scale * v from the residual stream after `direction.source_layer`.

    alpha = 1 with scale = 1 moves the residual of an average positive prompt's last
    token exactly onto the average negative one's at that layer; scale > 1 pushes further.
    """

    def __init__(self, adapter: ArchitectureAdapter, direction: ResidualDirection, *, scale: float = 1.0,
                 positions: str = "all"):
        super().__init__(adapter, positions)
        self.layer = direction.source_layer
        self.scale = float(scale)
        self._vector = torch.tensor(direction.vector, dtype=torch.float64)

    def first_steered_layer(self) -> int | None:
        return self.layer  # its hook edits layer L's output, so layer L itself must run

    def hooks(self, alpha: float) -> list[Hook]:
        shift = _DeviceCache(alpha * self.scale * self._vector)
        return [map_output(self.adapter.layers[self.layer], _in_float32(lambda x: x - shift.on(x.device)))]


class DirectionAblation(Intervention):
    """Directional ablation: x <- x - alpha * (x . d) d, d the unit mean difference, on every residual write.

    The embeddings (as the first layer receives them), and the outputs of every attention block and every
    MLP block: the residual stream never holds the direction, so each block's input lacks it too.
    """

    def __init__(self, adapter: ArchitectureAdapter, direction: ResidualDirection, *, positions: str = "all"):
        super().__init__(adapter, positions)
        vector = torch.tensor(direction.vector, dtype=torch.float64)
        norm = vector.norm()
        if norm == 0:
            raise ConfigError("directional ablation of a zero vector: positive and negative means are equal")
        self.unit = vector / norm

    def hooks(self, alpha: float) -> list[Hook]:
        unit = _DeviceCache(self.unit)

        @_in_float32
        def ablate(x: torch.Tensor) -> torch.Tensor:
            d = unit.on(x.device)
            return x - alpha * (x @ d).unsqueeze(-1) * d

        embeddings = [map_input(self.adapter.layers[0], ablate)]
        return embeddings + [map_output(block, ablate) for blocks in self.adapter.block_outputs for block in blocks]
