"""Load a causal LM, and the architecture adapter that holds every model-family detail.

A *neuron* of layer l is one coordinate of the input to that layer's MLP output
projection (`down_proj` in gated MLPs: act(gate_proj x) * up_proj x). The
adapter finds, for each supported family, the decoder layers, that projection
(the *neuron site*) and the residual stream after each layer (the layer's output).
In mixture-of-experts layers a neuron is (expert, j), read inside the fused experts
(`cna.experts`); the adapter's `layout` says where each expert's neurons sit.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cna.errors import CnaError, ConfigError
from cna.experts import ExpertsSpec, LayerExperts, NeuronLayout, find_experts, layer_spec

MODEL_CACHE_ENV = "CNA_MODEL_CACHE"
VOCAB_CHUNK = 16384  # unembedding rows per matrix product in `neuron_logits`: bounds a float32 copy of the matrix
DEFAULT_MODEL_CACHE = "~/.cache/cna-models"  # where `make models` / `make demo` fetch to


def model_cache() -> Path:
    """The folder of fetched models: $CNA_MODEL_CACHE, else ~/.cache/cna-models."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or DEFAULT_MODEL_CACHE).expanduser()


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its decoder layers, its neuron site and what writes to the residual stream."""

    layers: str  # attribute path from the top model to the list of decoder layers
    neuron_site: str  # path inside a decoder layer to the module whose INPUT is the neuron vector
    attention_out: str  # path inside a decoder layer to the module whose OUTPUT the attention block adds
    mlp_out: str | None = None  # the same for the MLP block; None: the neuron site (its output is the MLP's)
    position_embeddings: str | None = None  # learned absolute positions, added to the token embeddings
    conv1d: bool = False  # GPT-2's Conv1D stores its weight as [in, out] instead of nn.Linear's [out, in]
    final_norm: str = "model.norm"  # the norm between the last layer and the unembedding
    final_projection: str | None = None  # a projection after it, where the family may have one (OPT's project_out)
    experts: ExpertsSpec | None = None  # mixture-of-experts layers (layers without the fused module stay dense)


_GATED = Family("model.layers", "mlp.down_proj", "self_attn.o_proj")
# Gemma 2/3 and OLMo 2 normalise each block's output before adding it: the norms are what write to the residual.
_POST_NORMED = Family("model.layers", "mlp.down_proj", "post_attention_layernorm", "post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _POST_NORMED,
    "gemma3_text": _POST_NORMED,
    "phi3": _GATED,
    "olmo": _GATED,
    "olmo2": _POST_NORMED,
    "granite": _GATED,
    "phi": Family("model.layers", "mlp.fc2", "self_attn.dense", final_norm="model.final_layernorm"),
    "gpt2": Family("transformer.h", "mlp.c_proj", "attn.c_proj", position_embeddings="transformer.wpe", conv1d=True,
                   final_norm="transformer.ln_f"),
    "gptj": Family("transformer.h", "mlp.fc_out", "attn.out_proj", final_norm="transformer.ln_f"),
    "gpt_neox": Family("gpt_neox.layers", "mlp.dense_4h_to_h", "attention.dense",
                       final_norm="gpt_neox.final_layer_norm"),
    "opt": Family("model.decoder.layers", "fc2", "self_attn.out_proj",
                  position_embeddings="model.decoder.embed_positions", final_norm="model.decoder.final_layer_norm",
                  final_projection="model.decoder.project_out"),
    # Mixtures of experts: the MLP block ("mlp") is what writes to the residual; dense layers (DeepSeek-V3's first
    # ones, Qwen-MoE's mlp_only_layers) keep their down_proj as the neuron site.
    "qwen2_moe": Family("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp",
                        experts=ExpertsSpec(shared="mlp.shared_expert.down_proj")),
    "qwen3_moe": Family("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp", experts=ExpertsSpec()),
    "mixtral": Family("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp",
                      experts=ExpertsSpec(routing="mixtral",
                                          checkpoint_down="block_sparse_moe.experts.{expert}.w2.weight")),
    "olmoe": Family("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp", experts=ExpertsSpec()),
    "deepseek_v3": Family("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp",
                          experts=ExpertsSpec(routing="grouped_sigmoid", shared="mlp.shared_experts.down_proj")),
    "gpt_oss": Family("model.layers", "mlp.experts", "self_attn.o_proj", "mlp",
                      experts=ExpertsSpec(router="mlp.router", routing="topk_softmax", checkpoint_down=None)),
}


class UnsupportedModelError(CnaError):
    pass


class ArchitectureAdapter:
    """Uniform access to the layers, neuron sites and residual stream of a supported model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        family = FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"model_type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}"
            )
        self.model = model
        self.model_type = model_type
        self.family = family
        self.layers: list[nn.Module] = list(model.get_submodule(family.layers))
        # Per layer, its MoE modules, or None where the layer is dense (every layer of a dense family).
        self.experts: list[LayerExperts | None] = [
            find_experts(layer, family.experts) if family.experts else None for layer in self.layers]
        # A MoE layer's neuron site is its fused experts module: its neurons are read inside it (cna.experts).
        self.neuron_sites: list[nn.Module] = [
            experts.fused if experts else layer.get_submodule(family.neuron_site)
            for layer, experts in zip(self.layers, self.experts, strict=True)]
        self.n_layers = len(self.layers)
        # Per layer, the modules whose outputs the attention block and the MLP block add to the residual stream.
        self.block_outputs: list[tuple[nn.Module, nn.Module]] = [
            (layer.get_submodule(family.attention_out), layer.get_submodule(family.mlp_out or family.neuron_site))
            for layer in self.layers]
        # Where each layer's neurons sit (None for dense families: neuron j of every layer is coordinate j).
        self.layout: NeuronLayout | None = None
        if family.experts:
            self.layout = NeuronLayout(tuple(layer_spec(experts, None if experts else _site_width(site))
                                             for experts, site in zip(self.experts, self.neuron_sites, strict=True)))
        self.neurons_per_layer = self.layout.width if self.layout else _site_width(self.neuron_sites[0])
        self.hidden_size = model.get_input_embeddings().weight.shape[1]

    @property
    def total_neurons(self) -> int:
        """Every neuron, dense, routed and shared alike (a padded layer's padding is not counted)."""
        return self.layout.total if self.layout else self.n_layers * self.neurons_per_layer

    @property
    def has_experts(self) -> bool:
        return any(experts is not None for experts in self.experts)

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)

    @property
    def body(self) -> nn.Module:
        """The decoder stack without the LM head: discovery needs no logits."""
        return self.model.base_model

    def neuron_weights(self, layer: int) -> torch.Tensor:
        """A view of the site's weight with one row per neuron: row j is what neuron j writes.

        Only for weights held in memory at full precision: a quantised weight packs several
        neurons per element, and an offloaded one is a placeholder whose data lives elsewhere.
        """
        site = self.neuron_sites[layer]
        if is_quantized_module(site):
            raise CnaError(f"layer {layer}'s neuron weights are quantised ({type(site).__name__}); "
                           "bake a full-precision model")
        if is_offloaded(site):
            raise CnaError(f"layer {layer}'s neuron weights are offloaded (device_map put them on cpu or disk); "
                           "export from the checkpoint on disk instead")
        weight = site.weight
        return weight if self.family.conv1d else weight.t()

    def neuron_logits(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """[len(indices), vocab] float32: the logits each neuron's output weight adds when read straight through
        to the unembedding (the logit lens of a weight), for the tokens it promotes (high) and suppresses (low).

        Each norm on the way (the block's output norm where the family has one, then the final norm) is applied
        as `norm(w) - norm(0)`: its weight applied (Gemma's 1 + weight included), a LayerNorm's centring kept and
        its bias dropped (the same for every neuron). The norm also divides w by its own rms, one positive number
        per neuron, so no token's rank within a neuron changes; the rest of the residual, which sets that scale
        in a real forward, is left out. The unembedding's bias is dropped too.
        """
        if self.experts[layer] is not None:
            raise CnaError(f"layer {layer} is a mixture of experts: neuron_logits reads a dense layer's neurons "
                           "(layer, index), not an expert's")
        writes = self.neuron_weights(layer)[indices.to(self.neuron_sites[layer].weight.device)].detach()
        # mlp_out is a norm after the MLP (Gemma 2-3, OLMo 2), except in a mixture of experts, where it is the MoE
        # block holding the neuron site (a dense layer's MLP included): nothing to apply then.
        mlp_out = self.family.mlp_out
        if mlp_out is not None and not self.family.neuron_site.startswith(mlp_out + "."):
            writes = _linear_part(self.layers[layer].get_submodule(mlp_out), writes)
        writes = _linear_part(self.model.get_submodule(self.family.final_norm), writes)
        projection = _optional_submodule(self.model, self.family.final_projection)
        if projection is not None:
            writes = projection(writes.to(projection.weight.dtype))
        unembedding = self.model.get_output_embeddings().weight
        writes = writes.to(unembedding.device, torch.float32)
        chunks = [writes @ rows.float().t() for rows in unembedding.detach().split(VOCAB_CHUNK)]
        return torch.cat(chunks, 1).cpu()

    def expert_weights(self, layer: int, expert: int | None) -> torch.Tensor:
        """[neurons, hidden]: row j is what neuron j of the expert writes (a view of the weight in memory); expert
        None is a dense layer's MLP, as `neuron_weights`. Routed experts are slices of the fused down_proj."""
        experts = self.experts[layer]
        if experts is None:
            if expert is not None:
                raise CnaError(f"layer {layer} is dense: it has no expert {expert}")
            return self.neuron_weights(layer)
        routed = expert is not None and expert < experts.n_routed
        module = experts.fused if routed else experts.shared
        if expert is None or module is None or expert >= experts.n_routed + len(experts.shared_widths):
            raise CnaError(f"layer {layer} has no expert {expert} ({experts.n_routed} routed, "
                           f"{len(experts.shared_widths)} shared)")
        # A fused module has no `weight`: its quantisation shows in the model config or the tensor's dtype.
        quantised = is_quantized(module) if routed else is_quantized_module(module)
        if quantised:
            raise CnaError(f"layer {layer}'s expert weights are quantised; bake a full-precision model")
        if is_offloaded(module):
            raise CnaError(f"layer {layer}'s expert weights are offloaded (device_map put them on cpu or disk); "
                           "export from the checkpoint on disk instead")
        return experts.down_view(expert) if routed else module.weight.t()

    def write_views(self, layer: int) -> list[tuple[int, torch.Tensor]]:
        """(offset on the layer's neuron axis, `expert_weights` view) for every expert of the layer (one for dense)."""
        if self.layout is None:
            return [(0, self.neuron_weights(layer))]
        return [(block.offset, self.expert_weights(layer, block.expert)) for block in self.layout.blocks[layer]]


def _linear_part(norm: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """norm(v) - norm(0): what a normalisation does to a direction, without its bias."""
    parameter = next(norm.parameters(), None)
    dtype = parameter.dtype if parameter is not None else vectors.dtype
    device = parameter.device if parameter is not None else vectors.device
    vectors = vectors.to(device, dtype)
    with torch.no_grad():
        return norm(vectors) - norm(torch.zeros_like(vectors[:1]))


def _optional_submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    """The module at `path`, or None where there is no path or an attribute on it is None (OPT without
    project_out)."""
    if path is None:
        return None
    module = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _site_width(site: nn.Module) -> int:
    """The neuron count, from the layer's declared input features, never from a (possibly packed) weight.

    GPT-2's Conv1D declares it as `nx`; bitsandbytes replaces Conv1D by its Linear classes, which declare
    `in_features`.
    """
    width = getattr(site, "in_features", None) or getattr(site, "nx", None)
    if width is None:
        raise UnsupportedModelError(f"neuron site {type(site).__name__} declares no input width")
    return int(width)


def _dispatch_hooks(module: nn.Module) -> list:
    """accelerate's hooks on `module` (a SequentialHook holds several), or none."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the embedding's execution device under accelerate dispatch.

    An offloaded embedding's weight sits on `meta`; the dispatch hook knows where it will run.
    """
    embedding = model.get_input_embeddings()
    for hook in _dispatch_hooks(embedding):
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return embedding.weight.device


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's weights off its execution device (cpu or disk offload)."""
    return (any(getattr(hook, "offload", False) for hook in _dispatch_hooks(module))
            or any(p.device.type == "meta" for p in module.parameters(recurse=False)))


def is_quantized_module(module: nn.Module) -> bool:
    """Whether the module's weight is quantised, told by its quantisation state, not by its storage dtype.

    bitsandbytes 4-bit weights may be stored as bfloat16 (`bnb_4bit_quant_storage`), so a dtype check passes them;
    integer weights (other quantisers) count as quantised too.
    """
    weight = getattr(module, "weight", None)
    return (type(module).__module__.startswith("bitsandbytes")
            or type(weight).__module__.startswith("bitsandbytes")
            or getattr(weight, "quant_state", None) is not None
            or (isinstance(weight, torch.Tensor) and not weight.is_floating_point()))


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded the model through a quantiser (bitsandbytes, GPTQ, AWQ, ...)."""
    return (getattr(model, "hf_quantizer", None) is not None
            or getattr(model.config, "quantization_config", None) is not None
            or any(is_quantized_module(m) for m in model.modules()))


@dataclass
class ModelSpec:
    """How to find and load one model. `name` is a hub id; `local_name` a folder under $CNA_MODEL_CACHE."""

    name: str
    local_name: str | None = None
    path: str | None = None
    revision: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    device_map: str | None = None  # "auto": shard over all GPUs (and CPU) through accelerate
    quantization: str | None = None  # None, "4bit" or "8bit" (bitsandbytes, on the devices it supports)
    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter
    spec: ModelSpec
    source: str  # the folder or hub id it was loaded from


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("4bit", "8bit")


def resolve_source(spec: ModelSpec) -> str:
    """An explicit path, then $CNA_MODEL_CACHE/<local_name>, then the hub id."""
    if spec.path:
        path = Path(spec.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path '{spec.path}' is not a model folder (no config.json there)")
        return str(path)
    if spec.local_name:
        folder = model_cache() / spec.local_name
        if (folder / "config.json").is_file():
            return str(folder)
    return spec.name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def quantization_unavailable(quantization: str, device: torch.device) -> str | None:
    """Why bitsandbytes cannot quantise a model for `device` here, or None when it can.

    Recent bitsandbytes lists the device types it runs on (0.50: cpu and cuda among them); a version without
    that list runs on CUDA only.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"model.quantization '{quantization}' needs bitsandbytes: pip install 'cna[quant]'"
    import bitsandbytes

    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    if device.type not in supported:
        return (f"model.quantization '{quantization}': bitsandbytes {bitsandbytes.__version__} runs on "
                f"{', '.join(sorted(supported))}, not on {device.type}")
    return None


def _quantization_config(quantization: str | None, dtype: torch.dtype, device: torch.device):
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization '{quantization}' is not one of null, {', '.join(QUANTIZATIONS)}")
    problem = quantization_unavailable(quantization, device)
    if problem:
        raise ConfigError(problem)
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def _whole_model_on(device: torch.device) -> dict:
    """A device map that puts every module on `device` (cuda as its index, as accelerate expects)."""
    return {"": device.index or 0} if device.type == "cuda" else {"": device.type}


def _offload_error(spec: ModelSpec, error: ValueError) -> CnaError | None:
    """transformers' refusal to offload bitsandbytes layers, as one line saying what to set."""
    if "llm_int8_enable_fp32_cpu_offload" not in str(error):
        return None
    return CnaError(
        f"model.quantization '{spec.quantization}': the quantised model does not fit the GPU memory, so "
        f"device_map={spec.device_map!r} put layers on cpu or disk, where bitsandbytes layers cannot be offloaded; "
        "use more or larger GPUs, or set model.quantization=null (bfloat16 layers offload to cpu and disk)"
    )


def activation_identity(lm: LoadedModel) -> dict:
    """Everything about the loaded model that changes its activations: the statistics cache keys on it."""
    return activation_identity_of(lm.model, source=lm.source, revision=lm.spec.revision)


def activation_identity_of(model: nn.Module, *, source: str | None = None, revision: str | None = None) -> dict:
    """What changes a model's activations: where it came from, revision, dtype, quantisation settings, attention
    implementation and device type (the parameter dtype alone reads bfloat16 for bfloat16, 4-bit and 8-bit models
    alike). `source` defaults to the folder or hub id the model was loaded from."""
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    identity = {
        "source": source or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None),
        "revision": revision,
        "dtype": str(model.dtype),
        "quantization": None if quantization is None else {k: _plain(v) for k, v in sorted(quantization.items())},
        "attention": getattr(config, "_attn_implementation", None),
        "device": input_device(model).type,
    }
    # A mixture of experts' kernel changes sums in the last bits (dense models' keys are unchanged).
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and family.experts:
        identity["experts"] = getattr(config, "_experts_implementation", None)
    return identity


def _plain(value):
    """A quantisation setting as a JSON value (dtypes and enums become their names)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer for inference only: eval mode, no parameter requires grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    quantization = _quantization_config(spec.quantization, dtype, device)
    source = resolve_source(spec)
    kwargs = {"dtype": dtype, "revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if spec.device_map is not None or quantization is not None:
        kwargs["device_map"] = spec.device_map or _whole_model_on(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as error:
        offload = _offload_error(spec, error)
        if offload is None:
            raise
        raise offload from error
    except OSError as error:
        hint = f"; or set model.path, or put it under {model_cache()}/{spec.local_name or '<local_name>'}"
        raise CnaError(f"cannot load model '{source}': {str(error).splitlines()[0]}{hint}") from error
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, ArchitectureAdapter(model), spec, source)
