"""Speed and memory of discovery, steering and evaluation, as ratios measured in one process.

    CNA_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench.py --local-name qwen2.5-coder-0.5b-instruct
    make bench

Each figure compares variants on the same inputs, run in turn (A B A B ...) after a warm-up; a
figure is the median, min and max of the per-repetition ratios. Writes benchmarks/results.json
(or --out) and prints a table. Figures that take long (batching) can be skipped. Not yet measured
here: the end-to-end job time (use launch.py and its results.json timings_s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
from measure import PeakRss, interleaved, ratio, rss_mib, spread

from cna.batching import length_sorted_batches, pad_batch, position_ids
from cna.cache import StatisticsCache
from cna.data import encode_prompts, read_prompt_file
from cna.discovery import collect_statistics, contrastive_scores, select_circuit
from cna.evaluation.mmlu import evaluate_mmlu, load_mmlu_folder, stratified_sample
from cna.generation import generate
from cna.interventions import NeuronScale, baked_weights
from cna.models import ModelSpec, load_model

K_FRACTIONS = (0.0005, 0.001, 0.0025, 0.005, 0.01)


def plain_forward(adapter, prompts, pad_token_id: int, batch_size: int) -> None:
    """The same batches as discovery, through the same decoder stack, with no hooks."""
    device = adapter.input_device
    with torch.inference_mode():
        for rows in length_sorted_batches(prompts, batch_size):
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, "left")
            adapter.body(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids(mask).to(device), use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-name", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"), required="CNA_DATA_DIR" not in os.environ)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated figures to leave out")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    data = Path(args.data_dir)

    lm = load_model(ModelSpec(name=args.local_name, local_name=args.local_name))
    tokenizer, adapter, model = lm.tokenizer, lm.adapter, lm.model
    pad = tokenizer.pad_token_id
    harmful = read_prompt_file(data / "harmful_harmless_splits" / "harmful_train.json", "instruction")
    harmless = read_prompt_file(data / "harmful_harmless_splits" / "harmless_train.json", "instruction")
    jbb = read_prompt_file(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal")
    sample = random.Random(0).sample
    positive = encode_prompts(tokenizer, sample(harmful, 256))
    negative = encode_prompts(tokenizer, sample(harmless, 256))
    figures: dict[str, dict] = {}

    def report(name: str, value: dict, note: str) -> None:
        figures[name] = {**value, "note": note}
        print(f"{name:22s} median {value['median']:>9} (min {value['min']}, max {value['max']})  {note}", flush=True)

    # Memory first, on a heap that nothing else has grown yet; one forward pages the weights in.
    with torch.inference_mode():
        model(input_ids=torch.tensor([negative[0]], device=adapter.input_device))
    after_load = rss_mib()
    if "discovery_memory_mib" not in skip:
        peaks = []
        for _ in range(args.repetitions):
            with PeakRss() as memory:
                for side in (positive, negative):
                    collect_statistics(adapter, side, pad_token_id=pad, progress=False)
            peaks.append(memory.peak - after_load)
        report("discovery_memory_mib", spread(peaks),
               "peak RSS during discovery of 256 + 256 prompts - RSS after model load and one forward")

    stats = [collect_statistics(adapter, p[:64], pad_token_id=pad, progress=False) for p in (positive, negative)]
    circuit = select_circuit(contrastive_scores(*stats), model=args.local_name)
    # An end token outside the vocabulary: every generation runs exactly max_new_tokens steps.
    fixed_length = dict(pad_token_id=pad, eos_token_id=[model.config.vocab_size + 1], progress=False)

    if "capture_overhead" not in skip:
        batch = positive[:64]
        seconds = interleaved({
            "plain": lambda: plain_forward(adapter, batch, pad, 16),
            "capture": lambda: collect_statistics(adapter, batch, pad_token_id=pad, progress=False),
        }, args.repetitions)
        report("capture_overhead", ratio(seconds["capture"], seconds["plain"]),
               "discovery forward with statistics hooks / plain forward, 64 prompts, batch 16")

    prompts16 = encode_prompts(tokenizer, jbb[:16])
    steering = NeuronScale(adapter, circuit)

    def steered() -> None:
        with steering.steer(1.0):
            generate(model, prompts16, max_new_tokens=32, batch_size=16, **fixed_length)

    def baked() -> None:
        with baked_weights(adapter, circuit, 0.0):
            generate(model, prompts16, max_new_tokens=32, batch_size=16, **fixed_length)

    def unsteered() -> None:
        generate(model, prompts16, max_new_tokens=32, batch_size=16, **fixed_length)

    if not {"steering_overhead", "baked_overhead"} <= skip:
        seconds = interleaved({"plain": unsteered, "steered": steered, "baked": baked}, args.repetitions)
        report("steering_overhead", ratio(seconds["steered"], seconds["plain"]),
               "generation under NeuronScale hooks / unsteered, 16 prompts x 32 tokens")
        report("baked_overhead", ratio(seconds["baked"], seconds["plain"]),
               "generation with the circuit baked into down_proj / unsteered")

    if "batching_speedup" not in skip:
        prompts32 = encode_prompts(tokenizer, jbb[:32])
        seconds = interleaved({
            "one_at_a_time": lambda: generate(model, prompts32, max_new_tokens=64, batch_size=1, **fixed_length),
            "batched": lambda: generate(model, prompts32, max_new_tokens=64, batch_size=16, **fixed_length),
        }, max(1, args.repetitions - 1), warmup=False)
        report("batching_speedup", ratio(seconds["one_at_a_time"], seconds["batched"]),
               "one prompt at a time / batch 16, 32 JBB prompts x 64 tokens")

    if "sweep_reuse" not in skip:
        def sweep(cache_folder: Path | None) -> None:
            cache = StatisticsCache(cache_folder)
            for fraction in K_FRACTIONS:
                found = [cache.get_or_compute(f"{side}-{len(p)}", lambda p=p: collect_statistics(
                    adapter, p, pad_token_id=pad, progress=False)) for side, p in (("pos", positive[:64]),
                                                                                   ("neg", negative[:64]))]
                select_circuit(contrastive_scores(*found), model=args.local_name, k_fraction=fraction)

        def cached() -> None:
            folder = Path(args.out).parent / ".bench_cache"
            for old in folder.glob("*.safetensors"):
                old.unlink()
            sweep(folder)

        seconds = interleaved({"cached": cached, "independent": lambda: sweep(None)}, args.repetitions, warmup=False)
        report("sweep_reuse", ratio(seconds["cached"], seconds["independent"]),
               f"discovery of a {len(K_FRACTIONS)}-point k-fraction sweep with the cache / without, 64 + 64 prompts")

    if "mmlu_batched_speedup" not in skip:
        questions = stratified_sample(load_mmlu_folder(data / "mmlu", "test"), 48, seed=0)
        seconds = interleaved({
            "one_at_a_time": lambda: evaluate_mmlu(model, tokenizer, questions, batch_size=1, progress=False),
            "batched": lambda: evaluate_mmlu(model, tokenizer, questions, batch_size=8, progress=False),
        }, args.repetitions)
        report("mmlu_batched_speedup", ratio(seconds["one_at_a_time"], seconds["batched"]),
               "MMLU questions per second, batch 8 / one at a time, 48 questions")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.local_name, "repetitions": args.repetitions, "figures": figures,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
