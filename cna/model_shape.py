"""What a model's config.json says, read before any weights load: where the file is, and the depth and MLP width
(every expert's neurons in a mixture of experts) that the start-up checks compare a job's settings with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cna.errors import ConfigError
from cna.models import model_cache


def local_config(name: str, *, path: str | None = None, local_name: str | None = None,
                 revision: str | None = None) -> Path | None:
    """The model's config.json on this machine (model.path, the model cache, or the hub's cache), or None."""
    if path:
        candidate = Path(path).expanduser() / "config.json"
        return candidate if candidate.is_file() else None
    if local_name and (model_cache() / local_name / "config.json").is_file():
        return model_cache() / local_name / "config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(cached) if isinstance(cached, str) else None


@dataclass(frozen=True)
class ModelShape:
    """What the config checks need to know of a model, read from its config.json (no weights)."""

    n_layers: int
    neurons_per_layer: int | None  # None when the config does not say (checked again once the model loads)
    # Mixtures of experts: each layer's neurons (routed + shared experts; dense layers their MLP's), the routed
    # experts of a MoE layer and their width, and which layers have experts. None / () for dense models.
    layer_neurons: tuple[int, ...] | None = None
    experts: int | None = None
    expert_width: int | None = None
    moe_layers: tuple[int, ...] = ()

    def neurons_in(self, start: int, stop: int) -> int | None:
        """The neurons in layers [start, stop), or None where the config does not say."""
        if self.layer_neurons is not None:
            return sum(self.layer_neurons[start:stop])
        return None if self.neurons_per_layer is None else (stop - start) * self.neurons_per_layer


def _int(config: dict, key: str, default: int | None = None) -> int | None:
    value = config.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _moe_layout(config: dict, n_layers: int) -> tuple[int, int, list[int], list[int], int | None] | None:
    """(routed experts, their width, shared widths, MoE layers, dense layers' width) from a MoE family's config.json,
    with transformers' defaults for keys it leaves out; None for other families or a config missing a key."""
    model_type = config.get("model_type")
    # The hub's files and transformers 5's own (which writes some families' count under its alias) differ.
    routed = next((_int(config, key) for key in ("num_experts", "num_local_experts", "n_routed_experts")
                   if key in config), None)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        width, step = _int(config, "moe_intermediate_size"), _int(config, "decoder_sparse_step", 1)
        shared = [_int(config, "shared_expert_intermediate_size")] if model_type == "qwen2_moe" else []
        dense_only = config.get("mlp_only_layers") or []
        moe = [layer for layer in range(n_layers) if routed and step and layer not in dense_only
               and (layer + 1) % step == 0]
        dense = _int(config, "intermediate_size")
    elif model_type in ("mixtral", "olmoe", "gpt_oss"):
        width, shared, moe, dense = _int(config, "intermediate_size"), [], list(range(n_layers)), None
    elif model_type == "deepseek_v3":
        width = _int(config, "moe_intermediate_size")
        shared_count = _int(config, "n_shared_experts", 1)
        shared = [width * shared_count] if width and shared_count else []
        moe = list(range(_int(config, "first_k_dense_replace", 3) or 0, n_layers))
        dense = _int(config, "intermediate_size")
    else:
        return None
    if routed is None or width is None or None in shared:
        return None
    return routed, width, shared, moe, dense


def read_model_shape(config_path: Path) -> ModelShape | None:
    """Depth and MLP width from a config.json, whatever each family calls them; None if it names no depth.

    Mixtures of experts count every routed and shared expert's neurons (and dense layers' MLP neurons).
    """
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model: cannot read '{config_path}' ({error})") from error
    if not isinstance(config, dict):
        return None
    config = config.get("text_config") or config  # multimodal checkpoints nest the language model's settings
    n_layers = next((config[key] for key in ("num_hidden_layers", "n_layer", "num_layers") if key in config), None)
    if not isinstance(n_layers, int):
        return None
    moe = _moe_layout(config, n_layers)
    if moe is not None:
        routed, width, shared, moe_layers, dense = moe
        per_layer = tuple(routed * width + sum(shared) if layer in moe_layers else dense for layer in range(n_layers))
        if None in per_layer:
            return ModelShape(n_layers, None)
        return ModelShape(n_layers, max(per_layer), per_layer, routed, width, tuple(moe_layers))
    width = next((config[key] for key in ("intermediate_size", "n_inner", "ffn_dim") if config.get(key)), None)
    if width is None and isinstance(config.get("n_embd"), int):
        width = 4 * config["n_embd"]  # GPT-2 and GPT-J leave n_inner null for 4 x the hidden size
    return ModelShape(n_layers, width if isinstance(width, int) else None)
