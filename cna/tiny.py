"""A tiny random Llama (or mixture of experts) and word-level tokenizer: seconds to build, no downloads.

    python -m cna.tiny DIR                      # writes an ordinary Hugging Face folder (model.path=DIR or
                                                # CNA_TINY_MODEL=DIR)
    python -m cna.tiny DIR --family qwen3_moe   # a tiny mixture of experts instead (any key of MOE_CONFIGS)
    python -m cna.tiny DIR --thinking           # the thinking variant: its chat template opens a <think> block
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

VOCAB = 64
HIDDEN = 64
INTERMEDIATE = 128
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ANSWER_WORDS = ["yes", "no", "A", "B", "C", "D"]  # what the LLM judge and MMLU read
THINK_TOKENS = ["<think>", "</think>"]  # the thinking variant's reasoning markers, ids VOCAB and VOCAB + 1
# The thinking variant's template, as the DeepSeek-R1 distills': the generation prompt opens a reasoning block,
# and enable_thinking=false (Qwen3's switch) renders it empty and closed, so the model answers at once.
THINKING_TEMPLATE = ("<bos>{% for m in messages %} {{ m['content'] }}{% endfor %} w4 <think>"
                     "{% if enable_thinking is defined and not enable_thinking %} </think>{% endif %}")


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 3-layer Llama: hidden size 64, 128 MLP neurons per layer, vocabulary 64; eval mode, no gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **{**settings, **overrides})
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


# Tiny mixtures of experts, 3 layers of hidden size 64: 8 routed experts of 32 neurons, 2 chosen per token; the
# families' own twists kept (Qwen2-MoE's gated shared expert, DeepSeek-V3's dense first layer, its shared expert and
# group-limited routing, gpt-oss's biases, clamped activation and transposed weights).
_MOE_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   num_experts_per_tok=2)
MOE_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      intermediate_size=96),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96),
    "mixtral": dict(num_local_experts=8, intermediate_size=32),
    "olmoe": dict(num_experts=8, intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=96, first_k_dense_replace=1,
                        n_shared_experts=1, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, intermediate_size=32),
}


def tiny_moe(model_type: str = "qwen3_moe", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random mixture of experts of one family (`MOE_CONFIGS`); eval mode, no gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in MOE_CONFIGS:
        raise ValueError(f"no tiny mixture of experts for '{model_type}'; one of {', '.join(MOE_CONFIGS)}")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**_MOE_COMMON, **MOE_CONFIGS[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def tiny_tokenizer(thinking: bool = False):
    """A word-level tokenizer over the tiny vocabulary ("w4 w17 ... yes no A B C D"), with a chat template.

    Unknown words map to <unk>, so any English prompt encodes. `thinking` adds the reasoning markers <think> and
    </think> (as Qwen3 has them: added tokens, not special ones) and THINKING_TEMPLATE.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB - len(ANSWER_WORDS))})
    vocab.update({word: VOCAB - len(ANSWER_WORDS) + i for i, word in enumerate(ANSWER_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = "<bos>{% for m in messages %} {{ m['content'] }}{% endfor %} w4"
    if thinking:
        tokenizer.add_tokens(THINK_TOKENS)
        tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


def write_tiny_model(folder: str | Path, seed: int = 0, family: str = "llama", thinking: bool = False) -> Path:
    """The tiny model (the Llama, or a tiny mixture of experts of `family`) and its tokenizer, as a folder;
    `thinking`: the variant with reasoning markers."""
    folder = Path(folder)
    vocab = {"vocab_size": VOCAB + len(THINK_TOKENS)} if thinking else {}
    (tiny_llama(seed, **vocab) if family == "llama" else tiny_moe(family, seed, **vocab)).save_pretrained(folder)
    tiny_tokenizer(thinking).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m cna.tiny", description="write a tiny random model folder")
    parser.add_argument("folder")
    parser.add_argument("--family", default="llama", choices=["llama", *MOE_CONFIGS])
    parser.add_argument("--thinking", action="store_true", help="a chat template that opens a <think> block")
    arguments = parser.parse_args()
    print(write_tiny_model(arguments.folder, family=arguments.family, thinking=arguments.thinking))
