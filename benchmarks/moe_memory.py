"""Discovery memory on a tiny mixture of experts with 128-expert layers, against its dense twin (issue 27).

    .venv/bin/python benchmarks/moe_memory.py [--repetitions 3] [--prompts 128]

The MoE is a random Qwen3-MoE (hidden 256, 6 layers, 128 routed experts of 128 neurons, 8 chosen per token: 16,384
expert neurons per layer, the proportions of Qwen3-30B-A3B's 128 x 768); its dense twin is a random Qwen3 of the
same depth and hidden size whose MLP has the same 16,384 neurons per layer, so the statistics have the same shape
and only the capture path differs. Each figure is the peak RSS during discovery (positive and negative sets, then
the diverse set with the universal filter's top counts) minus the RSS after load and one forward, in a fresh
process per measurement, with the statistics hooks and, for reference, the same batches through the same decoder
with no hooks. Prints a table and writes benchmarks/moe_memory.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
from pathlib import Path

import torch
from measure import PeakRss, rss_mib

HIDDEN, LAYERS, EXPERTS, EXPERT_WIDTH, CHOSEN = 256, 6, 128, 128, 8
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(kind: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "moe":
        config = AutoConfig.for_model("qwen3_moe", num_experts=EXPERTS, moe_intermediate_size=EXPERT_WIDTH,
                                      num_experts_per_tok=CHOSEN, intermediate_size=EXPERT_WIDTH, **COMMON)
    else:
        config = AutoConfig.for_model("qwen3", intermediate_size=EXPERTS * EXPERT_WIDTH, **COMMON)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def prompts(n: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 64, (n,), generator=generator)
    return [torch.randint(4, 64, (int(length),), generator=generator).tolist() for length in lengths]


def peak_extra_mib(kind: str, n: int, hooks: bool) -> float:
    """MiB above the RSS after load and one forward, for discovery of n + n prompts and the diverse set."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import plain_forward

    from cna.discovery import DISCOVERY_TOKEN_BUDGET, collect_statistics
    from cna.models import ArchitectureAdapter

    torch.set_num_threads(2)
    model = build(kind)
    adapter = ArchitectureAdapter(model)
    sets = [(prompts(n, 1), None), (prompts(n, 2), None), (prompts(n, 3), 0.001)]
    with torch.inference_mode():
        model(input_ids=torch.tensor([sets[0][0][0]]))
    after_load = rss_mib()
    with PeakRss() as memory:
        for side, top_fraction in sets:
            if hooks:
                collect_statistics(adapter, side, pad_token_id=0, progress=False, top_fraction=top_fraction)
            else:
                plain_forward(adapter, side, 0, 16, DISCOVERY_TOKEN_BUDGET)
    return memory.peak - after_load


def in_fresh_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=128)
    args = parser.parse_args()
    figures: dict[str, dict] = {}
    for kind in ("moe", "dense"):
        model = build(kind)
        parameters = sum(p.numel() for p in model.parameters())
        neurons = __import__("cna.models", fromlist=["ArchitectureAdapter"]).ArchitectureAdapter(model).total_neurons
        del model
        runs = {"statistics": [], "no_hooks": []}
        for _ in range(args.repetitions):  # in turn, a fresh process each
            runs["statistics"].append(in_fresh_process(peak_extra_mib, kind, args.prompts, True))
            runs["no_hooks"].append(in_fresh_process(peak_extra_mib, kind, args.prompts, False))
        figures[kind] = {"parameters": parameters, "neurons": neurons,
                         **{name: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                                   "max": round(max(v), 1)} for name, v in runs.items()}}
        print(f"{kind:6s} {parameters / 1e6:6.1f}M parameters, {neurons} neurons: peak extra RSS with statistics "
              f"{figures[kind]['statistics']}, no hooks {figures[kind]['no_hooks']} MiB", flush=True)
    figures["settings"] = {"prompts": f"{args.prompts} + {args.prompts} + {args.prompts} (diverse, top 0.1%)",
                           "lengths": "8-63 tokens", "batch": "16, <= 256 tokens", "threads": 2,
                           "repetitions": args.repetitions, "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "experts_implementation": "grouped_mm (default on CPU)"}
    Path(__file__).with_name("moe_memory.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
