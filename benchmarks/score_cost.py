"""Discovery cost of each neuron score (method.score) relative to the paper's delta, on the same prompts.

    CNA_MODEL_CACHE=~/.cache/cna-models CNA_DATA_DIR=../shared/data OMP_NUM_THREADS=1 \
        .venv/bin/python benchmarks/score_cost.py --n 32

Each score's whole discovery runs in a fresh process (so one score's freed memory cannot hide another's peak):
delta = forward statistics of both sets; projection = the same plus <w_j, r>; attribution = the same plus one
backward pass over the positive set. Wall time is of discovery alone (the model is loaded and paged in first);
memory is the peak resident set during discovery minus the resident set before it (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import PeakRss, rss_mib

from cna.attribution import collect_gradients, first_tokens, refusal_log_odds, score_neurons
from cna.data import encode_prompts, read_prompt_file
from cna.discovery import DISCOVERY_TOKEN_BUDGET, collect_statistics, layer_at_fraction
from cna.models import ModelSpec, load_model

SCORES = ("delta", "projection", "attribution")
REFUSAL_STARTS = ["I'm sorry", "I cannot", "I can't", "Sorry"]  # conf/method/cna.yaml


def measure(score: str, args) -> dict:
    """One score's discovery in this process: seconds and extra resident memory."""
    loaded = load_model(ModelSpec(name=args.local_name, local_name=args.local_name))
    tokenizer, adapter = loaded.tokenizer, loaded.adapter
    splits = Path(args.data_dir) / "harmful_harmless_splits"
    encoded = [encode_prompts(tokenizer, random.Random(0).sample(read_prompt_file(splits / f"{name}_train.json",
                                                                                  "instruction"), args.n))
               for name in ("harmful", "harmless")]
    with torch.inference_mode():  # safetensors maps weights lazily: page them in before measuring
        loaded.model(input_ids=torch.tensor([encoded[1][0]], device=adapter.input_device))
    before = rss_mib()
    options = dict(pad_token_id=tokenizer.pad_token_id, batch_size=args.batch_size,
                   max_batch_tokens=DISCOVERY_TOKEN_BUDGET, progress=False)
    with PeakRss() as memory:
        started = time.perf_counter()
        positive, negative = (collect_statistics(adapter, prompts, **options) for prompts in encoded)
        gradients = None
        if score == "attribution":
            metric = refusal_log_odds(first_tokens(tokenizer, REFUSAL_STARTS))
            gradients = collect_gradients(adapter, encoded[0], metric, **options)
        score_neurons(score, positive, negative, adapter, gradients=gradients,
                      direction_layer=layer_at_fraction(adapter.n_layers, 0.5))
        seconds = time.perf_counter() - started
    tokens = sum(len(ids) for prompts in encoded for ids in prompts)
    return {"score": score, "seconds": round(seconds, 2), "extra_mib": round(memory.peak - before, 1),
            "rss_before_mib": round(before, 1), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-name", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--n", type=int, default=32, help="prompts per set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"), required="CNA_DATA_DIR" not in os.environ)
    parser.add_argument("--score", choices=SCORES, help="measure one score in this process (internal)")
    args = parser.parse_args()
    if args.score:
        print(json.dumps(measure(args.score, args)))
        return
    rows = {}
    for score in SCORES:
        command = [sys.executable, __file__, "--score", score, "--n", str(args.n), "--batch-size",
                   str(args.batch_size), "--local-name", args.local_name, "--data-dir", args.data_dir]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[score] = json.loads(output.strip().splitlines()[-1])
    delta = rows["delta"]
    for row in rows.values():
        row["time_ratio"] = round(row["seconds"] / delta["seconds"], 2)
        row["memory_ratio"] = round(row["extra_mib"] / delta["extra_mib"], 2)
    print(json.dumps({"model": args.local_name, "prompts_per_set": args.n, "batch_size": args.batch_size,
                      "token_budget": DISCOVERY_TOKEN_BUDGET, "scores": list(rows.values())}, indent=2))


if __name__ == "__main__":
    main()
