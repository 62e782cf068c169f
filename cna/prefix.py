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

Across jobs (`PrefixStore`, under the cache folder): the recorded states depend on the model, the prompt set
and its batches, never on the recipe, so every job of a sweep reads what the first one recorded. A job whose
lowest layer is L starts from the highest stored layer L' <= L (layers L'..L-1 are unsteered in both jobs)
and records its own L on the way, with the checkpoint layers it passes (each quarter of the depth by default), so
a later job with a lower L finds a start too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cna.hooks import Hook, attached, first_tensor
from cna.interventions import Intervention
from cna.io import save_atomically
from cna.models import ArchitectureAdapter

log = logging.getLogger(__name__)

MIB = 2**20


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


@dataclass
class _Kept:
    """One batch's states entering a layer: in memory, or in a file to be read onto `device`."""

    as_tuple: bool  # whether the replaced layers returned tuples
    states: torch.Tensor | None = None
    path: Path | None = None
    device: str = "cpu"

    def load(self) -> torch.Tensor:
        if self.states is not None:
            return self.states
        with safe_open(str(self.path), framework="pt", device=self.device) as saved:
            return saved.get_tensor("states")


def _read_stored(path: Path) -> _Kept:
    with safe_open(str(path), framework="pt") as saved:
        metadata = saved.metadata()
    return _Kept(as_tuple=metadata["as_tuple"] == "true", path=path, device=metadata["device"])


class PrefixStore:
    """Recorded prefixes kept across jobs: `<folder>/<prompt set>/layer_<L>/<batch>.safetensors`, written once.

    The prompt-set key covers the model's activation identity (source, revision, dtype, quantisation, attention,
    device type), the torch and transformers versions, the prompts' token ids and the batches. Writing stops
    when the folder holds `budget_mib`; reading never does.
    """

    def __init__(self, folder: str | Path, identity: dict, budget_mib: float):
        self.folder = Path(folder).expanduser()
        self.identity = identity
        used = sum(f.stat().st_size for f in self.folder.rglob("*.safetensors")) if self.folder.is_dir() else 0
        self.budget_left = budget_mib * MIB - used
        self.read_batches = 0  # batches whose states an earlier job recorded

    def set_key(self, prompts: Sequence[Sequence[int]], batches: list[list[int]]) -> str:
        fields = {"model": self.identity, "prompts": [list(p) for p in prompts], "batches": batches}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def find(self, key: str, index: int, layer: int) -> tuple[int, _Kept] | None:
        """The highest stored layer <= `layer` for batch `index` of a prompt set, with its states; None if none."""
        folder = self.folder / key
        stored = sorted((int(d.name.removeprefix("layer_")) for d in folder.glob("layer_*")), reverse=True) \
            if folder.is_dir() else []
        for candidate in (lower for lower in stored if lower <= layer):
            path = folder / f"layer_{candidate}" / f"{index}.safetensors"
            if not path.is_file():
                continue
            try:
                kept = _read_stored(path)
            except Exception as error:  # noqa: BLE001 - a truncated or foreign file: recorded again
                log.warning("prefix cache file %s is unreadable (%s): ignored", path, error)
                continue
            self.read_batches += 1
            return candidate, kept
        return None

    def save(self, key: str, layer: int, index: int, states: torch.Tensor, as_tuple: bool) -> Path | None:
        path = self.folder / key / f"layer_{layer}" / f"{index}.safetensors"
        if path.is_file():  # another job recorded the same states (an unreadable file is written again)
            try:
                _read_stored(path)
                return path
            except Exception:  # noqa: BLE001 - safetensors raises its own types for a truncated file
                pass
        size = states.numel() * states.element_size()
        if size > self.budget_left:
            log.info("prefix cache %s is full (prefix_cache_mib): batch %d not kept for later jobs", self.folder, index)
            return None
        self.budget_left -= size
        metadata = {"as_tuple": "true" if as_tuple else "false", "device": str(states.device)}
        return save_atomically(path, lambda temporary: save_file({"states": states.contiguous()}, str(temporary),
                                                           metadata=metadata))


class PromptPrefix:
    """The states entering layer `layer` for one prompt set, one entry per batch (None until recorded)."""

    def __init__(self, owner: LayerPrefixReuse, batches: list[list[int]], store_key: str | None):
        self.owner = owner
        self.batches = batches
        self.store_key = store_key
        self._kept: list[_Kept | None] = [None] * len(batches)

    @property
    def recorded(self) -> int:
        return sum(kept is not None for kept in self._kept)

    @contextmanager
    def forward(self, index: int) -> Iterator[None]:
        """Around the model forward of batch `index`: run layers L.. only if its states are known, else record them
        (running from a lower layer an earlier job stored, where there is one)."""
        layer, store = self.owner.layer, self.owner.store
        start = None
        if self._kept[index] is None and store is not None:
            start = store.find(self.store_key, index, layer)
            if start is not None and start[0] == layer:
                self._kept[index], start = start[1], None
        kept = self._kept[index]
        if kept is not None:
            with self.owner.skipping(layer, kept.load(), kept.as_tuple):
                yield
            return
        below = self.owner.skipping(start[0], start[1].load(), start[1].as_tuple) if start else nullcontext()
        with below, self._recording(index, start[0] if start else 0):
            yield

    @contextmanager
    def _recording(self, index: int, first_run: int) -> Iterator[None]:
        """Record the states entering this job's layer, and for the store those entering the checkpoint layers
        the forward passes through (first_run < c < L), so later jobs with a lower L find a start too."""
        layer, store = self.owner.layer, self.owner.store
        layers = [layer] + ([c for c in self.owner.checkpoints if first_run < c < layer] if store else [])
        seen: dict[int, tuple[torch.Tensor, bool]] = {}

        def recorder(entering: int):
            def record(_module, _args, output):
                seen[entering] = first_tensor(output).detach(), isinstance(output, tuple)
            return record

        with attached([Hook(self.owner.adapter.layers[c - 1], recorder(c), pre=False) for c in layers]):
            yield
        for entering, (states, as_tuple) in seen.items():
            stored = store.save(self.store_key, entering, index, states, as_tuple) if store else None
            if entering == layer:
                self._kept[index] = self.owner.keep(states, as_tuple, stored)


class LayerPrefixReuse:
    """Per job: recorded prefixes of every prompt set scored under an intervention whose lowest layer is `layer`."""

    def __init__(self, adapter: ArchitectureAdapter, layer: int, *, memory_mib: float = 1024,
                 disk_mib: float = 4096, store: PrefixStore | None = None, checkpoint_every: int | None = None):
        """`checkpoint_every`: the store also keeps the states entering every such layer a recording passes
        (default a quarter of the depth: 6, 12, 18 of 24)."""
        if not 0 < layer < adapter.n_layers:
            raise ValueError(f"prefix reuse needs a layer in [1, {adapter.n_layers}), got {layer}")
        self.adapter = adapter
        self.layer = layer
        self.store = store
        spacing = checkpoint_every or max(1, adapter.n_layers // 4)
        self.checkpoints = range(spacing, adapter.n_layers, spacing)
        self.memory_left = memory_mib * MIB
        self.disk_left = disk_mib * MIB
        self._prefixes: dict[str, PromptPrefix] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self._container = _layer_container(adapter)

    def prefix(self, prompts: Sequence[Sequence[int]], batches: list[list[int]]) -> PromptPrefix:
        """The (possibly still empty) prefix of these prompts in these batches."""
        key = hashlib.sha256(repr(([list(p) for p in prompts], batches)).encode()).hexdigest()
        if key not in self._prefixes:
            store_key = self.store.set_key(prompts, batches) if self.store else None
            self._prefixes[key] = PromptPrefix(self, batches, store_key)
        return self._prefixes[key]

    @property
    def recorded_batches(self) -> int:
        return sum(prefix.recorded for prefix in self._prefixes.values())

    def keep(self, states: torch.Tensor, as_tuple: bool, stored: Path | None) -> _Kept | None:
        """The states in memory, or in a file (the store's, else a temporary one), or None where neither has room."""
        size = states.numel() * states.element_size()
        if size <= self.memory_left:
            self.memory_left -= size
            return _Kept(as_tuple, states=states.clone())
        if stored is not None:
            return _Kept(as_tuple, path=stored, device=str(states.device))
        if size <= self.disk_left and self._disk_free() > 2 * size:
            self.disk_left -= size
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="cna-prefix-")
            path = Path(self._folder.name) / f"{len(list(Path(self._folder.name).iterdir()))}.safetensors"
            save_file({"states": states.contiguous()}, str(path))
            return _Kept(as_tuple, path=path, device=str(states.device))
        log.info("prefix states of %.0f MiB fit neither memory nor disk budget: full forward for that batch",
                 size / MIB)
        return None

    def _disk_free(self) -> int:
        return shutil.disk_usage(self._folder.name if self._folder else tempfile.gettempdir()).free

    @contextmanager
    def skipping(self, layer: int, states: torch.Tensor, as_tuple: bool) -> Iterator[None]:
        """Layers 0..layer-1 replaced by stubs that deliver `states` to `layer`; the real layers are back in
        `finally`."""
        originals = [self._container[i] for i in range(layer)]
        try:
            for i in range(layer):
                self._container[i] = _Entering(states if i == layer - 1 else None, as_tuple)
            yield
        finally:
            for i, original in enumerate(originals):
                self._container[i] = original

    def close(self) -> None:
        self._prefixes.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _layer_container(adapter: ArchitectureAdapter) -> nn.ModuleList:
    return adapter.model.get_submodule(adapter.family.layers)


def prefix_reuse(adapter: ArchitectureAdapter, intervention: Intervention | None, *, memory_mib: float,
                 disk_mib: float, store: PrefixStore | None = None) -> LayerPrefixReuse | None:
    """Reuse for this intervention, or None where nothing below its lowest layer is left to skip."""
    layer = None if intervention is None else intervention.first_steered_layer()
    if layer is None or layer == 0 or (memory_mib + disk_mib <= 0 and store is None):
        return None
    return LayerPrefixReuse(adapter, layer, memory_mib=memory_mib, disk_mib=disk_mib, store=store)
