"""A steered model as an ordinary checkpoint: the circuit's multipliers written into its `down_proj` weights,
or (directional ablation) the direction projected out of every weight that writes to the residual stream.

Multiplying neuron j by m is exactly multiplying what it writes (column j of a Linear
`down_proj`, row j of GPT-2's Conv1D) by m, so the exported folder loads and runs with
no hooks. The edit is done in float32 and cast back to the weight's dtype, as the hooks do.

Where the model was loaded from a safetensors folder, the export edits that folder's
shards on disk, one at a time: placement does not matter (layers offloaded to cpu or
disk, sharded over GPUs), nothing is loaded to the GPU, and shards without a circuit
layer are copied as they are. A model with no checkpoint folder (built in memory) is
baked in place and saved, which needs every circuit layer in memory. Quantised weights
pack several neurons per element, so a quantised model is refused.

Mixtures of experts: neuron j of routed expert e writes column j of `down_proj[e]` (row j
in gpt-oss's transposed layout), scaled in the fused tensor where the checkpoint stores
one, else in that expert's own `down_proj` (per-expert checkpoints: what transformers 5
converts from on load and writes back on save; Mixtral names it `w2`); a shared expert's
neurons are its `down_proj` columns, as a dense layer's.

Directional ablation (Arditi et al. 2024) is baked by weight orthogonalisation: W <- W - alpha d d^T W
for the token (and learned position) embeddings and each block's output matrix and bias, so nothing the
model writes to the residual stream has a component along d. It is linear in what each block writes, so
it equals the hooks at every alpha; it is done on the model in memory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cna.circuit import Circuit, ResidualDirection
from cna.errors import CnaError
from cna.models import ArchitectureAdapter, is_quantized

SINGLE_SHARD, SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"


def _scaled(rows: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The rows times m, computed in float32 and rounded once to their own dtype."""
    return (rows.float() * multiplier).to(rows.dtype)


@contextmanager
def baked_weights(adapter: ArchitectureAdapter, circuit: Circuit, multiplier: float) -> Iterator[None]:
    """Multiply each circuit neuron's output weights by m in place; the originals come back in `finally`.

    Scaling neuron j's value by m is exactly scaling what it writes (row j of the
    neuron-major weight view) by m, so no hook is needed to steer the model.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (layer, expert), neurons in _by_expert(circuit).items():
                weights = adapter.expert_weights(layer, expert)
                rows = torch.tensor([n.index for n in neurons], device=weights.device)
                saved.append((weights, rows, weights[rows].clone()))
                weights[rows] = _scaled(weights[rows], multiplier)
        yield
    finally:
        with torch.no_grad():
            for weights, rows, original in saved:
                weights[rows] = original


def _by_expert(circuit: Circuit) -> dict[tuple[int, int | None], list]:
    """The circuit's neurons per (layer, expert); expert None for dense layers (one group per layer)."""
    groups: dict[tuple[int, int | None], list] = {}
    for neuron in circuit.neurons:
        groups.setdefault((neuron.layer, neuron.expert), []).append(neuron)
    return groups


def export_baked_model(model, tokenizer, adapter: ArchitectureAdapter, circuit: Circuit, multiplier: float,
                       out_dir: str | Path) -> Path:
    """Write a steered model as an ordinary Hugging Face folder: loads and runs with no hooks."""
    out_dir = Path(out_dir)
    if is_quantized(model):
        raise CnaError("cannot export a quantised model: its down_proj weights pack several neurons per element; "
                       "load it with model.quantization=null and export that")
    source = checkpoint_folder(model)
    if source is not None:
        bake_checkpoint(source, out_dir, _checkpoint_edits(model, adapter, circuit), multiplier)
    else:
        with baked_weights(adapter, circuit, multiplier):
            model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "cna_bake.json").write_text(json.dumps(
        {"multiplier": multiplier, "circuit": circuit.to_dict()}, indent=2), encoding="utf-8")
    return out_dir


def checkpoint_folder(model: nn.Module) -> Path | None:
    """The safetensors folder the model was loaded from (a local folder or the hub cache), or None."""
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not name:
        return None
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=getattr(model.config, "_commit_hash", None))
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    return folder if (folder / SINGLE_SHARD).is_file() or (folder / SHARD_INDEX).is_file() else None


@dataclass(frozen=True)
class _Edit:
    """Scale some neurons' weights, in the first of `places` the checkpoint holds: (tensor name, the dim the neurons
    run along, the expert's slice of a fused tensor or None)."""

    places: tuple[tuple[str, int, int | None], ...]
    indices: list[int]


def _checkpoint_edits(model: nn.Module, adapter: ArchitectureAdapter, circuit: Circuit) -> list[_Edit]:
    """One edit per (layer, expert) of the circuit."""
    module_names = {module: name for name, module in model.named_modules()}
    # Conv1D stores [in, out]: neuron j is row j. nn.Linear stores [out, in]: neuron j is column j.
    neuron_dim = 0 if adapter.family.conv1d else 1
    edits = []
    for (layer, expert), neurons in _by_expert(circuit).items():
        indices = [n.index for n in neurons]
        experts = adapter.experts[layer]
        if experts is None or expert >= experts.n_routed:  # a dense layer, or a shared expert (an nn.Linear)
            site = adapter.neuron_sites[layer] if experts is None else experts.shared
            edits.append(_Edit(((f"{module_names[site]}.weight", neuron_dim, None),), indices))
            continue
        # Fused [experts, hidden, width] (gpt-oss: [experts, width, hidden]); one expert's own: [hidden, width].
        places = [(f"{module_names[experts.fused]}.down_proj", 0 if experts.fused.is_transposed else 1, expert)]
        if experts.spec.checkpoint_down:
            places.append((f"{module_names[adapter.layers[layer]]}."
                           f"{experts.spec.checkpoint_down.format(expert=expert)}", 1, None))
        edits.append(_Edit(tuple(places), indices))
    return edits


def _shard_map(source: Path) -> dict[str, str]:
    """Tensor name -> shard file name."""
    if (source / SHARD_INDEX).is_file():
        return json.loads((source / SHARD_INDEX).read_text(encoding="utf-8"))["weight_map"]
    with safe_open(str(source / SINGLE_SHARD), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), SINGLE_SHARD)


def _checkpoint_key(parameter: str, keys: dict[str, str]) -> str | None:
    """The checkpoint's name for a parameter: the same, or the same up to a prefix (GPT-2's `transformer.`); None if
    it has none."""
    matches = [key for key in keys
               if key == parameter or parameter.endswith(f".{key}") or key.endswith(f".{parameter}")]
    if len(matches) > 1:
        raise CnaError(f"cannot export: the checkpoint has {len(matches)} tensors matching '{parameter}', expected 1")
    return matches[0] if matches else None


def _place(edit: _Edit, keys: dict[str, str]) -> tuple[str, int, int | None]:
    for name, neuron_dim, expert in edit.places:
        key = _checkpoint_key(name, keys)
        if key is not None:
            return key, neuron_dim, expert
    names = " or ".join(f"'{name}'" for name, _, _ in edit.places)
    raise CnaError(f"cannot export: the checkpoint has 0 tensors matching {names}, expected 1")


def bake_checkpoint(source: Path, out_dir: Path, edits: list[_Edit], multiplier: float) -> None:
    """Copy the checkpoint folder to `out_dir`, rewriting only the shards that hold an edited weight."""
    if out_dir.resolve() == source.resolve():
        raise CnaError(f"cannot export into the source checkpoint itself ({source}); choose another folder")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise CnaError(f"cannot export: the checkpoint in {source} is quantised "
                       f"({config['quantization_config'].get('quant_method', 'unknown method')})")
    shards = _shard_map(source)
    by_shard: dict[str, dict[str, list[tuple]]] = {}
    for edit in edits:
        key, neuron_dim, expert = _place(edit, shards)
        by_shard.setdefault(shards[key], {}).setdefault(key, []).append((edit.indices, neuron_dim, expert))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in by_shard:
            shutil.copy2(path, out_dir / path.name)
    for shard, shard_edits in by_shard.items():
        with safe_open(str(source / shard), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        for key, changes in shard_edits.items():
            for indices, neuron_dim, expert in changes:
                weight = tensors[key] if expert is None else tensors[key][expert]  # an expert's slice is a view
                index = torch.tensor(indices)
                weight.index_copy_(neuron_dim, index, _scaled(weight.index_select(neuron_dim, index), multiplier))
        save_file(tensors, str(out_dir / shard), metadata=metadata)


def _writes(module: nn.Module, conv1d: bool) -> list[torch.Tensor]:
    """Views of a module's parameters with one residual-stream vector per row: what it can write."""
    weight = module.weight
    rows = [weight if conv1d or isinstance(module, nn.Embedding) else weight.t()]
    bias = getattr(module, "bias", None)
    return rows + ([bias.unsqueeze(0)] if bias is not None else [])


def _residual_writers(model: nn.Module, adapter: ArchitectureAdapter) -> list[tuple[nn.Module, bool]]:
    """Every module whose output is added to the residual stream, with whether it stores [in, out] (Conv1D)."""
    embeddings = [model.get_input_embeddings()]
    if adapter.family.position_embeddings:
        embeddings.append(model.get_submodule(adapter.family.position_embeddings))
    writers = [(module, False) for module in embeddings]
    for blocks in adapter.block_outputs:
        for block in blocks:
            if not (isinstance(block, nn.Linear) or (adapter.family.conv1d and hasattr(block, "nf"))):
                raise CnaError(f"cannot orthogonalise {adapter.model_type} weights: its blocks write through "
                               f"{type(block).__name__}, not a linear map; steer with DirectionAblation's hooks")
            writers.append((block, adapter.family.conv1d))
    return writers


def project_out(rows: torch.Tensor, unit: torch.Tensor, alpha: float, saved: list) -> None:
    """rows <- rows - alpha (rows . d) d in place, each row a residual write along the last axis; the original goes
    to `saved` first, for `restore_rows`."""
    d = unit.float().to(rows.device)
    saved.append((rows, rows.clone()))
    edited = rows.float()
    rows.copy_(edited - alpha * (edited @ d).unsqueeze(-1) * d)


def restore_rows(saved: list) -> None:
    """Every row `project_out` changed, back as it was (the last change first)."""
    with torch.no_grad():
        for rows, original in reversed(saved):
            rows.copy_(original)


@contextmanager
def orthogonalised_weights(model: nn.Module, adapter: ArchitectureAdapter, direction: ResidualDirection,
                           alpha: float = 1.0) -> Iterator[None]:
    """Directional ablation written into the weights in place; the originals come back in `finally`.

    A tied LM head is given its own copy of the unembedding first: the direction leaves what the
    model writes, not what it reads out.
    """
    if is_quantized(model):
        raise CnaError("cannot orthogonalise a quantised model's weights; load it with model.quantization=null")
    unit = torch.tensor(direction.vector, dtype=torch.float64)
    unit = (unit / unit.norm()).float()
    head, tied = model.get_output_embeddings(), model.config.tie_word_embeddings
    shared = head is not None and head.weight is model.get_input_embeddings().weight
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if shared:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        with torch.no_grad():
            for module, conv1d in _residual_writers(model, adapter):
                for rows in _writes(module, conv1d):
                    project_out(rows, unit, alpha, saved)
        yield
    finally:
        restore_rows(saved)
        if shared:
            head.weight = model.get_input_embeddings().weight
            model.config.tie_word_embeddings = tied


def export_orthogonalised_model(model, tokenizer, adapter: ArchitectureAdapter, direction: ResidualDirection,
                                out_dir: str | Path, alpha: float = 1.0) -> Path:
    """Write the directionally ablated model as an ordinary Hugging Face folder: loads and runs with no hooks."""
    out_dir = Path(out_dir)
    with orthogonalised_weights(model, adapter, direction, alpha):
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "cna_bake.json").write_text(json.dumps(
        {"alpha": alpha, "direction": direction.to_dict()}, indent=2), encoding="utf-8")
    return out_dir
