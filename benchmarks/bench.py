"""Speed and memory of discovery, steering and evaluation, as ratios measured in one process.

    make bench
    CNA_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench.py --models qwen2.5-coder-0.5b-instruct

Each speed figure compares variants on the same inputs, run in turn (A B A B ...) after a warm-up;
a figure is the median, min and max of the per-repetition ratios. Memory is measured in a fresh
process per repetition (a heap that earlier work has grown hides the peak). The end-to-end figure
runs one full `launch.py` job in a subprocess and splits its time by stage (results.json timings_s).
Writes benchmarks/results.json (the first model's figures at the top level, every model under
"models") and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import PeakRss, interleaved, ratio, rss_mib, spread

from cna.batching import length_sorted_batches, pad_batch, position_ids
from cna.cache import StatisticsCache
from cna.data import encode_prompts, read_prompt_file
from cna.discovery import DISCOVERY_TOKEN_BUDGET, collect_statistics, contrastive_scores, select_circuit
from cna.evaluation.mmlu import evaluate_mmlu, load_mmlu_folder, stratified_sample
from cna.generation import generate
from cna.interventions import NeuronScale, baked_weights
from cna.models import ModelSpec, load_model

K_FRACTIONS = (0.0005, 0.001, 0.0025, 0.005, 0.01)
MODELS = ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
HYDRA_MODEL = {"qwen2.5-coder-0.5b-instruct": "qwen_coder_0_5b", "smollm2-135m-instruct": "smollm2_135m"}
# One full job as issue 5 defines it: discovery on 128 + 128 prompts, 3 alpha points x 100 JBB x 64 tokens,
# MMLU 200 (plus KL on 100 harmless prompts, which costs one forward per prompt).
END_TO_END = ["method=cna", "prompts.n_positive=128", "prompts.n_negative=128", "alphas=[0.0,0.5,1.0]",
              "max_new_tokens=64", "eval.refusal.n=100", "eval.over_refusal.jbb_benign.n=0",
              "eval.over_refusal.xstest_safe.n=0", "eval.mmlu.n=200", "eval.kl.n=100", "resume=false"]


def discovery_sets(tokenizer, data: Path, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """n harmful and n harmless training instructions (seed 0), chat-encoded."""
    folder = data / "harmful_harmless_splits"
    sets = [read_prompt_file(folder / f"{name}_train.json", "instruction") for name in ("harmful", "harmless")]
    return tuple(encode_prompts(tokenizer, random.Random(0).sample(rows, n)) for rows in sets)


def plain_forward(adapter, prompts, pad_token_id: int, batch_size: int, max_tokens: int | None = None) -> None:
    """The same batches as discovery, through the same decoder stack, with no hooks."""
    device = adapter.input_device
    with torch.inference_mode():
        for rows in length_sorted_batches(prompts, batch_size, max_tokens):
            ids, mask = pad_batch([prompts[i] for i in rows], pad_token_id, "left")
            adapter.body(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids(mask).to(device), use_cache=False)


def peak_memory_in_fresh_process(local_name: str, data: str, hooks: bool) -> float:
    """MiB above the RSS after load and one forward (which pages the weights in), for 256 + 256 prompts."""
    lm = load_model(ModelSpec(name=local_name, local_name=local_name))
    pad = lm.tokenizer.pad_token_id
    positive, negative = discovery_sets(lm.tokenizer, Path(data), 256)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([negative[0]], device=lm.adapter.input_device))
    after_load = rss_mib()
    with PeakRss() as memory:
        for side in (positive, negative):
            if hooks:
                collect_statistics(lm.adapter, side, pad_token_id=pad, progress=False)
            else:
                plain_forward(lm.adapter, side, pad, 16, DISCOVERY_TOKEN_BUDGET)
    return memory.peak - after_load


def in_fresh_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def end_to_end(hydra_model: str, repetitions: int) -> tuple[dict, dict[str, float]]:
    """Wall seconds of one full launch.py job (fresh statistics cache each time), and its last stage split."""
    walls, stages = [], {}
    for _ in range(repetitions):
        with tempfile.TemporaryDirectory() as scratch:
            run_dir = Path(scratch) / "job"
            started = time.perf_counter()
            subprocess.run([sys.executable, "launch.py", f"model={hydra_model}", *END_TO_END,
                            f"cache_dir={scratch}/cache", f"hydra.run.dir={run_dir}"], check=True)
            walls.append(time.perf_counter() - started)
            stages = json.loads((run_dir / "results.json").read_text())["timings_s"]
    return spread(walls), stages


def measure_model(local_name: str, args, skip: set[str]) -> dict[str, dict]:
    data = Path(args.data_dir)
    figures: dict[str, dict] = {}

    def report(name: str, value: dict, note: str) -> None:
        figures[name] = {**value, "note": note}
        print(f"{local_name[:14]:14s} {name:22s} median {value['median']:>9} (min {value['min']}, max {value['max']})"
              f"  {note}", flush=True)

    if "discovery_memory_mib" not in skip:
        peaks, plains = [], []
        for _ in range(args.repetitions):  # with hooks and without, in turn, a fresh process each
            peaks.append(in_fresh_process(peak_memory_in_fresh_process, local_name, args.data_dir, True))
            plains.append(in_fresh_process(peak_memory_in_fresh_process, local_name, args.data_dir, False))
        report("discovery_memory_mib", spread(peaks),
               f"peak RSS during discovery of 256 + 256 prompts - RSS after load and one forward, fresh process "
               f"each; batch 16, <= {DISCOVERY_TOKEN_BUDGET} tokens per batch; the same batches with no hooks: "
               f"{spread(plains)['median']:.0f} MiB")
        report("discovery_memory_ratio", ratio(peaks, plains),
               "peak extra RSS with the statistics hooks / the same batches through the same decoder with no hooks, "
               "fresh processes in turn; target <= 1.10")

    lm = load_model(ModelSpec(name=local_name, local_name=local_name))
    tokenizer, adapter, model = lm.tokenizer, lm.adapter, lm.model
    pad = tokenizer.pad_token_id
    positive, negative = discovery_sets(tokenizer, data, 64)
    jbb = read_prompt_file(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal")
    stats = [collect_statistics(adapter, p, pad_token_id=pad, progress=False) for p in (positive, negative)]
    circuit = select_circuit(contrastive_scores(*stats), model=local_name)
    # An end token outside the vocabulary: every generation runs exactly max_new_tokens steps.
    fixed_length = dict(pad_token_id=pad, eos_token_id=[model.config.vocab_size + 1], progress=False)

    if "capture_overhead" not in skip:
        seconds = interleaved({
            "plain": lambda: plain_forward(adapter, positive, pad, 16, DISCOVERY_TOKEN_BUDGET),
            "capture": lambda: collect_statistics(adapter, positive, pad_token_id=pad, progress=False),
        }, args.repetitions)
        report("capture_overhead", ratio(seconds["capture"], seconds["plain"]),
               "discovery forward with statistics hooks / plain forward, the same 64 prompts and batches")

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
               f"generation under NeuronScale hooks ({len(circuit.neurons)} neurons) / unsteered, "
               "16 JBB prompts x 32 tokens")
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
                    adapter, p, pad_token_id=pad, progress=False)) for side, p in (("pos", positive[:32]),
                                                                                   ("neg", negative[:32]))]
                select_circuit(contrastive_scores(*found), model=local_name, k_fraction=fraction)

        def cached() -> None:
            with tempfile.TemporaryDirectory() as folder:
                sweep(Path(folder))

        seconds = interleaved({"cached": cached, "independent": lambda: sweep(None)}, args.repetitions, warmup=False)
        report("sweep_reuse", ratio(seconds["cached"], seconds["independent"]),
               f"discovery of a {len(K_FRACTIONS)}-point k-fraction sweep with the cache / without, 32 + 32 prompts")

    if "mmlu_batched_speedup" not in skip:
        questions = stratified_sample(load_mmlu_folder(data / "mmlu", "test"), 48, seed=0)
        seconds = interleaved({
            "one_at_a_time": lambda: evaluate_mmlu(model, tokenizer, questions, batch_size=1, progress=False),
            "batched": lambda: evaluate_mmlu(model, tokenizer, questions, batch_size=8, progress=False),
        }, args.repetitions)
        report("mmlu_batched_speedup", ratio(seconds["one_at_a_time"], seconds["batched"]),
               "MMLU questions per second, batch 8 / one at a time, 48 questions (0-shot, stratified); a GPU figure: "
               "a 0-shot prompt already keeps a CPU busy, so there is no CPU target")

    if "end_to_end_s" not in skip and local_name in HYDRA_MODEL:
        wall, stages = end_to_end(HYDRA_MODEL[local_name], args.e2e_repetitions)
        report("end_to_end_s", wall, "one launch.py job: discovery 128 + 128, alphas 0 / 0.5 / 1 x 100 JBB x 64 "
               "tokens, MMLU 200, KL 100; seconds by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
        figures["end_to_end_s"]["stages_s"] = stages
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated local model names")
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"), required="CNA_DATA_DIR" not in os.environ)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--e2e-repetitions", type=int, default=1, help="full jobs for end_to_end_s (each is minutes)")
    parser.add_argument("--skip", default="", help="comma-separated figures to leave out")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    models = [name for name in args.models.split(",") if name]

    started = time.perf_counter()
    # The end-to-end job (about 15 minutes on qwen here) runs for the first model only.
    by_model = {name: measure_model(name, args, skip if name == models[0] else skip | {"end_to_end_s"})
                for name in models}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **by_model[models[0]], "model": models[0], "models": by_model, "repetitions": args.repetitions,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M"), "bench_seconds": round(time.perf_counter() - started),
    }, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
