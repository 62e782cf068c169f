"""Wall time and memory of contrastive discovery on a real model.

    CNA_DATA_DIR=../shared/data .venv/bin/python benchmarks/discovery_cost.py \
        --local-name qwen2.5-coder-0.5b-instruct --n 128

Peak memory is the process's resident set, sampled every 5 ms by a thread;
"discovery extra" is the peak during discovery minus the resident set after
the model has loaded and run one forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from measure import PeakRss, rss_mib

from cna.data import encode_prompts, packaged_prompts, read_prompt_file
from cna.discovery import collect_statistics, contrastive_scores, select_circuit, universal_neurons
from cna.models import ModelSpec, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-name", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--n", type=int, default=128, help="prompts per set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"), required="CNA_DATA_DIR" not in os.environ)
    args = parser.parse_args()

    loaded = load_model(ModelSpec(name=args.local_name, local_name=args.local_name))
    tokenizer, adapter = loaded.tokenizer, loaded.adapter
    splits = Path(args.data_dir) / "harmful_harmless_splits"
    sets = {name: random.Random(0).sample(read_prompt_file(splits / f"{name}_train.json", "instruction"), args.n)
            for name in ("harmful", "harmless")}
    encoded = {name: encode_prompts(tokenizer, prompts) for name, prompts in sets.items()}
    diverse = encode_prompts(tokenizer, packaged_prompts("diverse"))
    # safetensors maps weights lazily: one forward pages them all in, so they are not billed to discovery.
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([encoded["harmless"][0]], device=adapter.input_device))
    after_load = rss_mib()

    with PeakRss() as memory:
        started = time.perf_counter()
        stats = {name: collect_statistics(adapter, ids, pad_token_id=tokenizer.pad_token_id,
                                          batch_size=args.batch_size, desc=name) for name, ids in encoded.items()}
        discovery_s = time.perf_counter() - started
        started = time.perf_counter()
        diverse_stats = collect_statistics(adapter, diverse, pad_token_id=tokenizer.pad_token_id,
                                           batch_size=args.batch_size, top_fraction=0.001, desc="diverse")
        filter_s = time.perf_counter() - started
    circuit = select_circuit(contrastive_scores(stats["harmful"], stats["harmless"]), model=args.local_name,
                             universal=universal_neurons(diverse_stats, 0.8))
    tokens = sum(len(ids) for prompts in encoded.values() for ids in prompts)
    result = {
        "model": args.local_name,
        "prompts": {"positive": args.n, "negative": args.n, "tokens": tokens, "batch_size": args.batch_size},
        "discovery_s": round(discovery_s, 2),
        "universal_filter_s": round(filter_s, 2),
        "universal_filter_prompts": len(diverse),
        "rss_after_load_mib": round(after_load, 1),
        "peak_rss_mib": round(memory.peak, 1),
        "discovery_extra_mib": round(memory.peak - after_load, 1),
        "k": circuit.k,
        "universal_removed": circuit.universal_removed,
        "layer_counts": {layer: count for layer, count in circuit.layer_counts.items() if count},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
