"""Layer-prefix reuse: single-forward metrics (MMLU, KL) run only the layers an intervention can change.

A neuron circuit whose lowest layer is L, or CAA adding its vector after layer L, leaves every layer
below L as it is, so the hidden states entering layer L are the unsteered ones at every strength. The
first forward over a prompt set records them (it is a full forward, so it costs nothing extra); every
later forward over the same prompts and batches swaps layers 0..L-1 for stubs that hand layer L the
recorded states, and runs only layers L.. and the head. The model's own code still builds the attention
masks, position ids and rotary embeddings from the same inputs, so layers L.. compute exactly what a full
forward would: float32 logits are bit-identical.

Directional ablation edits the residual stream at every layer: no prefix, no reuse.

Memory is bounded: states are kept per batch in the activation dtype (exactness needs it) up to
`memory_mib`, then written to a temporary folder, and a batch that fits neither (`disk_mib` spent, or
a full disk) simply runs the full forward every time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cna.hooks import Hook, attached, first_tensor
from cna.interventions import Intervention, NeuronScale, SteeringVector
from cna.models import ArchitectureAdapter

log = logging.getLogger(__name__)

MIB = 2**20


def first_steered_layer(intervention: Intervention | None) -> int | None:
    """The lowest decoder layer whose computation the intervention changes; None where it changes all of them."""
    if isinstance(intervention, NeuronScale):
        return min(intervention.circuit.by_layer())
    if isinstance(intervention, SteeringVector):
        return intervention.layer  # its hook edits layer L's output, so layer L itself must run
    return None


class _Entering(nn.Module):
    """Stands in for a decoder layer below L: layer L-1's stand-in returns the recorded states, the others pass
    their input on."""

    def __init__(self, states: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.states = states
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.states is None else self.states
        return (out,) if self.as_tuple else out


class PromptPrefix:
    """The states entering layer `layer` for one prompt set, one entry per batch (None until recorded)."""

    def __init__(self, owner: LayerPrefixReuse, batches: list[list[int]]):
        self.owner = owner
        self.batches = batches
        self._states: list[torch.Tensor | tuple[Path, str] | None] = [None] * len(batches)
        self._tuple_output = False

    @property
    def recorded(self) -> int:
        return sum(state is not None for state in self._states)

    @contextmanager
    def forward(self, index: int) -> Iterator[None]:
        """Around the model forward of batch `index`: run layers L.. only if its states are known, else record them."""
        state = self._states[index]
        if state is None:
            with self._recording(index):
                yield
            return
        states = load_file(str(state[0]), device=state[1])["states"] if isinstance(state, tuple) else state
        with self.owner.skipping(states, self._tuple_output):
            yield

    @contextmanager
    def _recording(self, index: int) -> Iterator[None]:
        seen: list[torch.Tensor] = []

        def record(_module, _args, output):
            self._tuple_output = isinstance(output, tuple)
            seen.append(first_tensor(output).detach())

        with attached([Hook(self.owner.adapter.layers[self.owner.layer - 1], record, pre=False)]):
            yield
        if seen:
            self._states[index] = self.owner.store(seen[-1])


class LayerPrefixReuse:
    """Per job: recorded prefixes of every prompt set scored under an intervention whose lowest layer is `layer`."""

    def __init__(self, adapter: ArchitectureAdapter, layer: int, *, memory_mib: float = 1024,
                 disk_mib: float = 4096):
        if not 0 < layer < adapter.n_layers:
            raise ValueError(f"prefix reuse needs a layer in [1, {adapter.n_layers}), got {layer}")
        self.adapter = adapter
        self.layer = layer
        self.memory_left = memory_mib * MIB
        self.disk_left = disk_mib * MIB
        self._prefixes: dict[str, PromptPrefix] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self._container = _layer_container(adapter)

    def prefix(self, prompts: Sequence[Sequence[int]], batches: list[list[int]]) -> PromptPrefix:
        """The (possibly still empty) prefix of these prompts in these batches."""
        key = hashlib.sha256(repr(([list(p) for p in prompts], batches)).encode()).hexdigest()
        if key not in self._prefixes:
            self._prefixes[key] = PromptPrefix(self, batches)
        return self._prefixes[key]

    @property
    def recorded_batches(self) -> int:
        return sum(prefix.recorded for prefix in self._prefixes.values())

    def store(self, states: torch.Tensor) -> torch.Tensor | tuple[Path, str] | None:
        """The states kept in memory, or a file and the device to load them to, or None where neither has room."""
        size = states.numel() * states.element_size()
        if size <= self.memory_left:
            self.memory_left -= size
            return states.clone()
        if size <= self.disk_left and self._disk_free() > 2 * size:
            self.disk_left -= size
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="cna-prefix-")
            path = Path(self._folder.name) / f"{len(list(Path(self._folder.name).iterdir()))}.safetensors"
            save_file({"states": states.contiguous()}, str(path))
            return path, str(states.device)
        log.info("prefix states of %.0f MiB fit neither memory nor disk budget: full forward for that batch",
                 size / MIB)
        return None

    def _disk_free(self) -> int:
        return shutil.disk_usage(self._folder.name if self._folder else tempfile.gettempdir()).free

    @contextmanager
    def skipping(self, states: torch.Tensor, as_tuple: bool) -> Iterator[None]:
        """Layers 0..L-1 replaced by stubs that deliver `states` to layer L; the real layers are back in `finally`."""
        originals = [self._container[i] for i in range(self.layer)]
        try:
            for i in range(self.layer):
                self._container[i] = _Entering(states if i == self.layer - 1 else None, as_tuple)
            yield
        finally:
            for i, layer in enumerate(originals):
                self._container[i] = layer

    def close(self) -> None:
        self._prefixes.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _layer_container(adapter: ArchitectureAdapter) -> nn.ModuleList:
    return adapter.model.get_submodule(adapter.family.layers)


def prefix_reuse(adapter: ArchitectureAdapter, intervention: Intervention | None, *, memory_mib: float,
                 disk_mib: float) -> LayerPrefixReuse | None:
    """Reuse for this intervention, or None where nothing below its lowest layer is left to skip."""
    layer = first_steered_layer(intervention)
    if layer is None or layer == 0 or memory_mib + disk_mib <= 0:
        return None
    return LayerPrefixReuse(adapter, layer, memory_mib=memory_mib, disk_mib=disk_mib)

