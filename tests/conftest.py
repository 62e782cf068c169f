"""Tiny random models built from configs (no downloads), and the real offline models for integration tests."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cna.models import ArchitectureAdapter
from cna.tiny import HIDDEN, VOCAB, tiny_llama, write_tiny_model

# Per-family config keys for a 2-layer model with hidden size 32 and 64 MLP neurons per layer.
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
FAMILY_CONFIGS: dict[str, dict] = {
    name: _COMMON
    for name in ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
                 "olmo2", "granite", "phi", "gpt_neox"]
}
FAMILY_CONFIGS["gpt2"] = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=VOCAB, bos_token_id=1,
                              eos_token_id=2)
FAMILY_CONFIGS["gptj"] = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4, vocab_size=VOCAB,
                              bos_token_id=1, eos_token_id=2)
FAMILY_CONFIGS["opt"] = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**FAMILY_CONFIGS[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def random_prompts(n: int, seed: int, low: int = 5, high: int = 24) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=generator)
    return [torch.randint(4, VOCAB, (int(length),), generator=generator).tolist() for length in lengths]


@dataclass
class PlantedModel:
    model: torch.nn.Module
    adapter: ArchitectureAdapter
    positive_neurons: list[tuple[int, int]]  # larger on the positive prompts
    negative_neurons: list[tuple[int, int]]  # larger on the negative prompts
    universal_neuron: tuple[int, int]  # large on every prompt, and the largest delta
    positive_trigger: int
    negative_trigger: int
    writer: tuple[int, int] = (2, 100)  # a positive neuron of the last layer whose output weight writes to the logits
    promoted_token: int = 40  # the token its output weight was built to promote most, through the final norm
    decoy_token: int = 41  # promoted most if the final norm's weight were left out
    suppressed_token: int = 42  # the token it suppresses most

    def prompts(self, n: int, seed: int, ending: int | None) -> list[list[int]]:
        """Random prompts of random length whose last token is `ending` (a random plain token if None)."""
        prompts = random_prompts(n, seed, high=16)
        plain = [t for t in range(10, VOCAB)]
        return [p[:-1] + [ending if ending is not None else plain[(seed + i) % len(plain)]]
                for i, p in enumerate(prompts)]


def planted_model() -> PlantedModel:
    """A tiny Llama whose chosen neurons respond to the last prompt token, through its weights.

    Three orthonormal directions u, v, w of the embedding space: every token carries 3w,
    the positive trigger also 10u, the negative trigger 10v, and no other token has any u
    or v. Positive neurons read u, the negative neuron reads v, the universal neuron reads
    w (so it is large on every prompt) and u (so its delta is the largest of all). Their
    output weights are zeroed so they do not disturb later layers, except the writer's: it sits in the
    last layer and writes along a unit direction d, which the unembedding reads through the final norm (its
    weight g set to 2 on half of the coordinates and 0.5 on the rest): the promoted token's row is
    20 d / g (logit 20 |d|^2 = 20 per unit-rms write), the suppressed token's -20 d / g, and the decoy's
    14 d / g^2 (logit 14 x 1.25 = 17.5, but 14 x 2.125 = 29.75 > 25 for the promoted one if g were ignored).
    """
    model = tiny_llama(seed=1)
    adapter = ArchitectureAdapter(model)
    generator = torch.Generator().manual_seed(2)
    u, v, w = torch.linalg.qr(torch.randn(HIDDEN, 3, generator=generator)).Q.T
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        plain = 0.5 * torch.randn(VOCAB, HIDDEN, generator=generator)
        for direction in (u, v, w):
            plain -= (plain @ direction).unsqueeze(-1) * direction
        embedding.copy_(plain + 3 * w)
        embedding[7] += 10 * u
        embedding[8] += 10 * v
        planted = {(0, 3): u, (1, 10): u, (2, 100): u, (1, 50): v, (2, 7): (4 * u + 2 * w)}
        for (layer, index), reads in planted.items():
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[index] = 3 * reads if layer != 2 or index != 7 else reads
            mlp.up_proj.weight[index] = 3 * reads if layer != 2 or index != 7 else reads
            mlp.down_proj.weight[:, index] = 0
        planted_model = PlantedModel(model, adapter, [(0, 3), (1, 10), (2, 100)], [(1, 50)], (2, 7), 7, 8)
        writes = torch.ones(HIDDEN) / HIDDEN**0.5
        gain = torch.where(torch.arange(HIDDEN) % 2 == 0, 2.0, 0.5)
        model.model.norm.weight.copy_(gain)
        layer, index = planted_model.writer
        # Small: the neuron fires at several hundred on positive prompts, and the residual should not be all its write.
        model.model.layers[layer].mlp.down_proj.weight[:, index] = 0.005 * writes
        model.lm_head.weight[planted_model.promoted_token] = 20 * writes / gain
        model.lm_head.weight[planted_model.suppressed_token] = -20 * writes / gain
        model.lm_head.weight[planted_model.decoy_token] = 14 * writes / gain**2
    return planted_model


def model_cache() -> Path:
    return Path(os.environ.get("CNA_MODEL_CACHE", Path.home() / ".cache" / "cna-models")).expanduser()


def data_dir() -> Path:
    return Path(os.environ.get("CNA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny Llama and tokenizer saved as an ordinary Hugging Face folder."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def fetched_model(name: str) -> Path:
    folder = model_cache() / name
    if not (folder / "config.json").is_file():
        pytest.fail(f"{folder} is missing: run `make models` (../shared/models/fetch {name})")
    return folder


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    return fetched_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_folder() -> Path:
    return fetched_model("qwen2.5-coder-0.5b-instruct")


# The vLLM engine's tests need vLLM, whose pins (torch, transformers) differ from the main lock: they run in their
# own environment (`make test-vllm`: .venv-vllm, requirements/vllm.lock), where tests/vllm is collected.
# (tests/ is on sys.path, so this folder itself is found as a namespace package `vllm`: it has no origin.)
_VLLM = importlib.util.find_spec("vllm")
collect_ignore = [] if _VLLM is not None and _VLLM.origin is not None else ["vllm"]
