"""A tiny random Llama and word-level tokenizer: seconds to build, no downloads.

    python -m cna.tiny DIR              # writes an ordinary Hugging Face folder (model.path=DIR or CNA_TINY_MODEL=DIR)
    python -m cna.tiny DIR --thinking   # the thinking variant: its chat template opens a <think> block
"""

from __future__ import annotations

import sys
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


def write_tiny_model(folder: str | Path, seed: int = 0, thinking: bool = False) -> Path:
    """The tiny model and tokenizer as a Hugging Face folder; `thinking`: the variant with reasoning markers."""
    folder = Path(folder)
    tiny_llama(seed, **({"vocab_size": VOCAB + len(THINK_TOKENS)} if thinking else {})).save_pretrained(folder)
    tiny_tokenizer(thinking).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    arguments = sys.argv[1:]
    thinking = "--thinking" in arguments
    folders = [a for a in arguments if a != "--thinking"]
    if len(folders) != 1:
        sys.exit("usage: python -m cna.tiny DIR [--thinking]")
    print(write_tiny_model(folders[0], thinking=thinking))
