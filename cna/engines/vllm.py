"""The vLLM engine (`engine=vllm`, `pip install 'cna[vllm]'`): generation and next-token scoring through vLLM's
offline `LLM`, steered neuron by neuron inside it.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so cna reaches its model directly. Steering is
done one of two ways at each point, restored exactly on leaving:
- weight edits, where the backend keeps plain weight tensors (CUDA; on CPU only with `plain_cpu_weights`, since
  vLLM's CPU backend repacks linear weights for oneDNN): CNA and the random control in scale mode at every
  position scale their `down_proj` columns (`cna.export.baked_weights`), directional ablation orthogonalises the
  embeddings and every block's output matrix (the tied unembedding keeps its own copy). Nothing runs per token,
  so they work with CUDA graphs (`enforce_eager=false`);
- hooks in eager mode elsewhere: the intervention's own hooks (`Intervention.hooks_at`), applied per token.
  vLLM flattens a step's requests into one token axis and mixes prefills with decodes, so `positions=prompt` and
  `generated` gate each token by whether its position lies inside its request's prompt (read from the model
  runner each step). vLLM's decoder layers pass the residual stream as two tensors (hidden, residual) that the
  next layer's norm adds; a hook on the stream applies to their sum and hands on (steered, 0).
vLLM's prefix cache keys on tokens, not on the steering: it is off by default, and when on
(`prefix_caching=true`) it is emptied whenever the steering changes.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cna.engines import register_engine
from cna.engines.base import Engine
from cna.errors import CnaError, ConfigError
from cna.export import project_out, restore_rows
from cna.generation import eos_token_ids
from cna.hooks import Hook, attached
from cna.interventions import DirectionAblation, Intervention, NeuronScale
from cna.model_shape import local_config
from cna.models import FAMILIES, resolve_device, resolve_dtype
from cna.schema import bounded, choice

# Families whose vLLM modules carry transformers' names for layers, neuron sites and residual writers.
VLLM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


@dataclass
class VllmEngineConfig:
    """`engine=vllm` (conf/engine/vllm.yaml)."""

    name: str = choice("vllm", ("vllm",))
    enforce_eager: bool = True  # hooks need eager mode; false (CUDA graphs) only where every point is a weight edit
    weight_edits: bool = True  # steer by exact weight edits where the weights are plain tensors (else hooks)
    plain_cpu_weights: bool = False  # CPU: keep plain weights (torch matmul, no oneDNN packing) so edits apply
    gpu_memory_utilization: float = bounded(0.35, 0, 1, low_open=True)  # of GPU memory (of RAM on CPU)
    kv_cache_gib: int | None = bounded(None, 1, integer=True)  # the KV cache's size (null: from the utilisation)
    max_model_len: int = bounded(4096, 16, integer=True)  # prompt + response tokens per request
    max_num_seqs: int = bounded(256, 1, integer=True)  # requests decoded together
    block_size: int | None = bounded(None, 1, integer=True)  # KV cache block (null: the backend's)
    prefix_caching: bool = False  # vLLM's automatic prefix cache, emptied whenever the steering changes


def _needs_hooks(method, weights_editable: bool) -> str | None:
    """Why a method's points need hooks (said in a ConfigError), or None where weight edits express them all."""
    positions, mode = getattr(method, "positions", "all"), getattr(method, "mode", None)
    if not weights_editable:
        return "the weights on this device are packed (vLLM's CPU backend), so steering runs as hooks"
    if positions != "all":
        return f"method.positions={positions} gates tokens by hooks"
    if method.name in ("cna", "random") and mode == "scale" or method.name == "direction":
        return None
    return f"method {method.name}" + (f" in {mode} mode" if mode else "") + " steers by hooks"


def _model_type(job) -> str | None:
    config = local_config(job.model.name, path=job.model.path, local_name=job.model.local_name,
                          revision=job.model.revision)
    if config is None:
        return None
    import json

    settings = json.loads(config.read_text(encoding="utf-8"))
    return (settings.get("text_config") or settings).get("model_type")


class VllmAdapter:
    """The layers, neuron sites and residual writers of a vLLM model, named as cna.models.ArchitectureAdapter names
    them, so a method's intervention steers it unchanged (`Intervention.on`)."""

    def __init__(self, model: torch.nn.Module):
        model_type = model.config.model_type
        if model_type not in VLLM_FAMILIES:
            raise CnaError(f"engine=vllm: model_type '{model_type}' is not supported; supported: "
                           f"{', '.join(VLLM_FAMILIES)}")
        family = FAMILIES[model_type]
        self.model, self.model_type, self.family = model, model_type, family
        self.layers = list(model.get_submodule(family.layers))
        self.neuron_sites = [layer.get_submodule(family.neuron_site) for layer in self.layers]
        self.block_outputs = [(layer.get_submodule(family.attention_out),
                               layer.get_submodule(family.mlp_out or family.neuron_site)) for layer in self.layers]
        self.n_layers = len(self.layers)
        self.neurons_per_layer = int(self.neuron_sites[0].input_size)
        # The families vLLM steers here are dense: no fused experts, neuron j of every layer is coordinate j.
        self.experts, self.layout, self.has_experts = [None] * self.n_layers, None, False
        self.embeddings = model.get_submodule(family.layers.rsplit(".", 1)[0] + ".embed_tokens")

    @property
    def editable(self) -> bool:
        """Whether every neuron site holds its weight as a plain [hidden, neurons] tensor (not packed)."""
        return all(site.weight.dim() == 2 and site.weight.shape[1] == self.neurons_per_layer
                   and site.weight.is_floating_point() for site in self.neuron_sites)

    def neuron_weights(self, layer: int) -> torch.Tensor:
        if not self.editable:
            raise CnaError(f"layer {layer}'s down_proj weight is packed by the backend; steer by hooks")
        return self.neuron_sites[layer].weight.t()

    def expert_weights(self, layer: int, expert: int | None) -> torch.Tensor:
        """The neuron-major weight view cna.export.baked_weights scales (dense: expert is None)."""
        if expert is not None:
            raise CnaError(f"layer {layer}: engine=vllm steers dense models only, got expert {expert}")
        return self.neuron_weights(layer)


def _model_runner(worker):
    return worker.model_runner


class _TokenGate:
    """Which tokens of the running step are prompt tokens: position < its request's prompt length.

    vLLM schedules prefills and decodes together, flattened into one token axis; the model runner knows, for the
    step under way, each request's token range (query_start_loc) and prompt length (input_batch)."""

    def __init__(self, runner, prompt: bool):
        self.runner, self.prompt, self.mask = runner, prompt, None

    def note_step(self, _module, _args, kwargs) -> None:
        positions = kwargs["positions"]
        batch = self.runner.input_batch
        requests = batch.num_reqs
        starts = torch.from_numpy(self.runner.query_start_loc.np[: requests + 1].copy()).long()
        lengths = torch.from_numpy(batch.num_prompt_tokens[:requests].copy()).long()
        scheduled = int(starts[-1])
        prompt_lengths = torch.repeat_interleave(lengths, starts.diff())
        in_prompt = torch.zeros(positions.shape[0], dtype=torch.bool)
        in_prompt[:scheduled] = positions[:scheduled].cpu() < prompt_lengths
        self.mask = (in_prompt if self.prompt else ~in_prompt).unsqueeze(-1).to(positions.device)


def _chosen(mask: torch.Tensor | None, steered: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    return steered if mask is None else torch.where(mask, steered, plain)


def _on_stream(transform, hidden: torch.Tensor, residual: torch.Tensor | None, mask) -> tuple:
    """A decoder layer's (hidden, residual) with `transform` applied to the residual stream they add up to."""
    if residual is None:
        return _chosen(mask, transform(hidden), hidden), None
    zeros = torch.zeros_like(residual)
    return _chosen(mask, transform(hidden + residual), hidden), _chosen(mask, zeros, residual)


def _engine_hook(hook: Hook, decoder_layers: set[int], gate: _TokenGate | None) -> Hook:
    """`hook`'s transform on the vLLM module, per token where a gate says which tokens it applies to."""
    transform = hook.transform
    if transform is None:
        raise CnaError(f"a hook on {type(hook.module).__name__} has no transform that could run inside vLLM")

    def mask():
        return None if gate is None else gate.mask

    if id(hook.module) in decoder_layers and hook.pre:  # vLLM calls layer(positions, hidden_states, residual)
        def stream_in(_module, args, kwargs):
            hidden, residual = (args[1], args[2]) if len(args) >= 3 else (kwargs["hidden_states"], kwargs["residual"])
            hidden, residual = _on_stream(transform, hidden, residual, mask())
            if len(args) >= 3:
                return (args[0], hidden, residual, *args[3:]), kwargs
            return args, {**kwargs, "hidden_states": hidden, "residual": residual}
        return Hook(hook.module, stream_in, pre=True, with_kwargs=True)
    if id(hook.module) in decoder_layers:
        def stream_out(_module, _args, output):
            return _on_stream(transform, output[0], output[1], mask()) + tuple(output[2:])
        return Hook(hook.module, stream_out, pre=False)
    if hook.pre:
        def read(_module, args, kwargs):
            return (_chosen(mask(), transform(args[0]), args[0]), *args[1:]), kwargs
        return Hook(hook.module, read, pre=True, with_kwargs=True)

    def write(_module, _args, output):
        if isinstance(output, tuple):  # vLLM's linear layers return (output, bias)
            return (_chosen(mask(), transform(output[0]), output[0]), *output[1:])
        return _chosen(mask(), transform(output), output)
    return Hook(hook.module, write, pre=False)


@contextmanager
def orthogonalised(adapter: VllmAdapter, unit: torch.Tensor, alpha: float) -> Iterator[None]:
    """Directional ablation in the vLLM model's weights: W <- W - alpha d d^T W for the embeddings and every block's
    output matrix and bias (cna.export.orthogonalised_weights' arithmetic); a tied unembedding gets its own copy of
    the original first. Restored in `finally`."""
    model, embedding = adapter.model, adapter.embeddings.weight
    head = getattr(model, "lm_head", None)
    shared = head is not None and getattr(head, "weight", None) is embedding
    writers = [embedding] + [rows for blocks in adapter.block_outputs for block in blocks
                             for rows in (block.weight.t(), getattr(block, "bias", None)) if rows is not None]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if shared:
            head.weight = torch.nn.Parameter(embedding.detach().clone(), requires_grad=False)
        with torch.no_grad():
            for rows in writers:
                project_out(rows if rows.dim() == 2 else rows.unsqueeze(0), unit, alpha, saved)
        yield
    finally:
        restore_rows(saved)
        if shared:
            head.weight = embedding


@register_engine
class VllmEngine(Engine):
    name = "vllm"
    config_type = VllmEngineConfig
    loads = 0  # vLLM models started in this process: one per job, however many points

    @classmethod
    def check(cls, config: VllmEngineConfig, job) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("engine=vllm: vLLM is not installed: pip install 'cna[vllm]' (or `make setup-vllm` "
                              "for the CPU build in its own environment)")
        model = job.model
        if model.quantization is not None:
            raise ConfigError(f"model.quantization: engine=vllm loads the checkpoint itself and takes no bitsandbytes "
                              f"setting; expected null, got {model.quantization!r}")
        if model.device_map is not None:
            raise ConfigError(f"model.device_map: engine=vllm runs on one device; expected null, got "
                              f"{model.device_map!r}")
        model_type = _model_type(job)
        if model_type is not None and model_type not in VLLM_FAMILIES:
            raise ConfigError(f"engine=vllm: model_type '{model_type}' is not supported (vLLM modules named as "
                              f"cna's adapter expects): {', '.join(VLLM_FAMILIES)}; use engine=hf")
        editable = config.weight_edits and (resolve_device(model.device).type == "cuda" or config.plain_cpu_weights)
        why = _needs_hooks(job.method, editable)
        if not config.enforce_eager and why is not None:
            raise ConfigError(f"engine.enforce_eager: {why}, which CUDA graphs and torch.compile skip; expected "
                              "true, got false")

    @classmethod
    def start(cls, config: VllmEngineConfig, lm, job) -> VllmEngine:
        device = resolve_device(lm.spec.device)
        dtype = str(resolve_dtype(lm.spec.dtype, device)).removeprefix("torch.")
        return cls(config, lm.source, dtype=dtype, stop_token_ids=eos_token_ids(lm.model, lm.tokenizer),
                   seed=job.seed)

    def __init__(self, config: VllmEngineConfig, source: str, *, dtype: str, stop_token_ids: Sequence[int],
                 seed: int = 0):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: hooks and weights reachable
        # The transformers model shares the process: vLLM's CPU backend would pin its threads to cores and cut
        # them to one; it keeps torch's thread count and the scheduler's placement unless told otherwise.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM
        from vllm import _custom_ops as ops

        self.config, self.stops = config, sorted(set(stop_token_ids))
        packing = ops._supports_onednn
        ops._supports_onednn = packing and not config.plain_cpu_weights  # read while the linear layers load
        try:
            extra = {} if config.block_size is None else {"block_size": config.block_size}
            if config.kv_cache_gib is not None:
                extra["kv_cache_memory_bytes"] = config.kv_cache_gib * 2**30
            self.llm = LLM(model=source, dtype=dtype, enforce_eager=config.enforce_eager, seed=seed,
                           gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len,
                           max_num_seqs=config.max_num_seqs, enable_prefix_caching=config.prefix_caching,
                           skip_tokenizer_init=True, generation_config="vllm", **extra)
        finally:
            ops._supports_onednn = packing
        VllmEngine.loads += 1
        self.runner = self.llm.collective_rpc(_model_runner)[0]
        self.model = self.runner.get_model()
        self.adapter = VllmAdapter(self.model)

    def identity(self) -> dict:
        import vllm

        return {"name": self.name, "vllm": vllm.__version__, "enforce_eager": self.config.enforce_eager,
                "weights": "plain" if self.adapter.editable else "packed"}

    def intervention(self, intervention: Intervention) -> Intervention:
        return intervention.on(self.adapter)

    def weight_edit(self, intervention: Intervention, alpha: float, multiplier: float | None):
        """The context that writes this point into the weights, or None where it runs as hooks."""
        if not (self.config.weight_edits and self.adapter.editable and intervention.positions == "all"):
            return None
        if isinstance(intervention, NeuronScale) and intervention.mode == "scale":
            return intervention.baked(1.0 - alpha if multiplier is None else multiplier)
        if isinstance(intervention, DirectionAblation):
            return orthogonalised(self.adapter, intervention.unit, alpha)
        return None

    @contextmanager
    def steering(self, intervention: Intervention, alpha: float, multiplier: float | None) -> Iterator[None]:
        self._forget_prefixes()
        try:
            edit = self.weight_edit(intervention, alpha, multiplier)
            if edit is not None:
                with edit:
                    yield
                return
            if not self.config.enforce_eager:
                raise CnaError("engine.enforce_eager: this point steers by hooks, which CUDA graphs skip")
            gate = None if intervention.positions == "all" else _TokenGate(self.runner, intervention.positions ==
                                                                           "prompt")
            layers = {id(layer) for layer in self.adapter.layers}
            hooks = [_engine_hook(hook, layers, gate) for hook in intervention.hooks_at(alpha, multiplier)]
            if gate is not None:
                hooks.insert(0, Hook(self.model, gate.note_step, pre=True, with_kwargs=True))
            with attached(hooks):
                yield
        finally:
            self._forget_prefixes()

    def _forget_prefixes(self) -> None:
        """KV computed under one steering must never serve another: the prefix cache keys on tokens alone."""
        if self.config.prefix_caching and not self.llm.reset_prefix_cache():
            raise CnaError("vLLM could not empty its prefix cache (requests still running)")

    def _run(self, prompts: Sequence[Sequence[int]], max_tokens: int, progress: bool):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=self.stops,
                                detokenize=False)
        return self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=progress)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int, progress: bool,
                 desc: str) -> list[list[int]]:
        """vLLM schedules its own batches (engine.max_num_seqs); `batch_size` is the transformers engine's."""
        outputs = self._run(prompts, max_new_tokens, progress)
        tokens = [list(output.outputs[0].token_ids) for output in outputs]
        return [t[:-1] if t and t[-1] in self.stops else t for t in tokens]

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], *, token_ids: Sequence[int] | None = None,
                            batch_size: int, max_batch_tokens: int | None, progress: bool, desc: str,
                            reuse=None) -> torch.Tensor:
        """One greedy step per prompt; the logits are read as vLLM computes them (a hook on its logits processor:
        one row per request, in the model runner's batch order), then normalised in float32 as the transformers
        engine does."""
        selected = None if token_ids is None else torch.tensor(list(token_ids))
        rows: dict[str, torch.Tensor] = {}
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)

        def keep(_module, _args, logits):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            if selected is not None:
                logprobs = logprobs[:, selected.to(logprobs.device)]
            # A request's last row is its full prompt's (a chunked prefill's earlier rows are overwritten).
            for request, row in zip(self.runner.input_batch.req_ids, logprobs.cpu(), strict=False):
                rows[request] = row

        with attached([Hook(self.model.logits_processor, keep, pre=False)]):
            outputs = self._run(prompts, 1, progress=False)
        bar.update(len(prompts))
        bar.close()
        by_request = {request.rsplit("-", 1)[0]: row for request, row in rows.items()}  # vLLM adds "-<suffix>"
        return torch.stack([by_request[output.request_id] for output in outputs])

    def close(self) -> None:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        self.runner = self.model = None
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
