"""Issue 15's figures: what evaluation reuses across strengths and jobs, as ratios measured in one process.

    CNA_DATA_DIR=... CNA_MODEL_CACHE=... .venv/bin/python benchmarks/evaluation_reuse.py --only prefix,generation

- prefix: MMLU + KL of a 3-strength job (alphas 0, 0.5, 1, plus KL's unsteered reference) for a circuit in the
  last 9 of 24 layers, with layer-prefix reuse / full forwards: prefixes from the store an earlier job of the
  sweep filled (`eval_prefix_reuse`), and recorded in the timed job itself (`eval_prefix_reuse_first_job`).
- scoring: MMLU at a fixed batch size against batches capped at a number of padded tokens
  (`scoring_batch_tokens`); not in the default --only.
- generation: refilled / plain batched generation at batch sizes 16, 32, 64 (tokens compared), and a CNA
  circuit baked into the weights / the same circuit by hooks (`generation_refill`, `generation_batch_size`,
  `bake_vs_hooks`).
- sweep: a 4-recipe multirun with alphas {0, 1}, baseline cache / none, `--repetitions` pairs in turn
  (`sweep_baseline_reuse`).
- end_to_end: the end-to-end job scaled down (`--scale`), the old code path (no prefix reuse, no refill, no
  baseline cache) / the new one, and the new one with its baseline already cached (`end_to_end_ratio`).

Each figure is written into benchmarks/results.json (top level and under models.<model>) with the load
average at its start and end. Scratch files go to --scratch, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from measure import ratio, spread

from cna.circuit import Circuit, Neuron
from cna.config import compose_job
from cna.data import _deduplicate, encode_prompts, read_prompt_file
from cna.evaluation.mmlu import evaluate_mmlu, load_mmlu_folder, stratified_sample
from cna.evaluation.scoring import next_token_logprobs
from cna.generation import eos_token_ids, generate
from cna.interventions import NeuronScale, baked_weights
from cna.models import ModelSpec, activation_identity, load_model
from cna.pipeline import run
from cna.prefix import LayerPrefixReuse, PrefixStore

HYDRA_MODEL = {"qwen2.5-coder-0.5b-instruct": "qwen_coder_0_5b", "smollm2-135m-instruct": "smollm2_135m"}
QUIET = ["logger=none", "resume=false", "eval.over_refusal.jbb_benign.n=0", "eval.over_refusal.xstest_safe.n=0"]
OLD_PATH = ["prefix_reuse_mib=0", "prefix_reuse_disk_mib=0", "prefix_cache_mib=0", "refill_generation=false",
            "reuse_baseline=false", "scoring_batch_tokens=null"]


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def spread_circuit(n_layers: int, width: int, lowest: int, per_layer: int = 13) -> Circuit:
    """A fixed circuit in layers lowest..n_layers-1 (what reuse costs depends on its lowest layer only)."""
    neurons = [Neuron(layer, (97 * i + layer) % width, 1.0, 1.0, 0.0)
               for layer in range(lowest, n_layers) for i in range(per_layer)]
    return Circuit("bench", "cna", neurons, n_layers, width)


def prefix_figure(lm, data: Path, scratch: Path, repetitions: int, n_questions: int, n_kl: int) -> dict:
    adapter, tokenizer = lm.adapter, lm.tokenizer
    lowest = adapter.n_layers - 9
    steer = NeuronScale(adapter, spread_circuit(adapter.n_layers, adapter.neurons_per_layer, lowest))
    questions = stratified_sample(load_mmlu_folder(data / "mmlu", "test"), n_questions, 0)
    harmless = read_prompt_file(data / "harmful_harmless_splits" / "harmless_val.json", "instruction")[:n_kl]
    kl_prompts = encode_prompts(tokenizer, harmless)
    pad = tokenizer.pad_token_id

    def evaluation(reuse: LayerPrefixReuse | None):
        reference = next_token_logprobs(lm.model, kl_prompts, pad_token_id=pad, progress=False, reuse=reuse)
        results = []
        for alpha in (0.0, 0.5, 1.0):
            with steer.steer(alpha):
                mmlu = evaluate_mmlu(lm.model, tokenizer, questions, batch_size=16, progress=False, reuse=reuse)
                kl = next_token_logprobs(lm.model, kl_prompts, pad_token_id=pad, progress=False, reuse=reuse)
            results.append((mmlu.predictions, kl))
        return reference, results

    store = PrefixStore(scratch / "prefix_store", activation_identity(lm), budget_mib=4096)
    evaluation(LayerPrefixReuse(adapter, lowest, store=store))  # an earlier job of the sweep fills the store
    variants = {"full": lambda: None, "first_job": lambda: LayerPrefixReuse(adapter, lowest),
                "later_job": lambda: LayerPrefixReuse(adapter, lowest, store=PrefixStore(
                    scratch / "prefix_store", activation_identity(lm), budget_mib=4096))}
    before = load()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    identical = True
    for _ in range(repetitions):  # in turn; outputs compared with the full forwards'
        for name, reuse in variants.items():
            started = time.perf_counter()
            outputs = evaluation(reuse())
            seconds[name].append(time.perf_counter() - started)
            if name == "full":
                full = outputs
            identical &= full[0].equal(outputs[0]) and all(
                a[0] == b[0] and a[1].equal(b[1]) for a, b in zip(full[1], outputs[1], strict=True))
    sets = f"MMLU {n_questions} + KL {n_kl} (reference + alphas 0, 0.5, 1), circuit in layers {lowest}-" \
           f"{adapter.n_layers - 1} of {adapter.n_layers}"
    common = {"full_s": spread(seconds["full"]), "identical": identical, "load": [before, load()]}
    return {"eval_prefix_reuse": {
        **ratio(seconds["later_job"], seconds["full"]), "reuse_s": spread(seconds["later_job"]), **common,
        "note": f"{sets}; prefix from the store an earlier job of the sweep filled (once per model and evaluation "
                "set) / full forwards"},
        "eval_prefix_reuse_first_job": {
        **ratio(seconds["first_job"], seconds["full"]), "reuse_s": spread(seconds["first_job"]), **common,
        "note": f"{sets}; prefix recorded in the timed run (the sweep's first job) / full forwards"}}


def scoring_figure(lm, data: Path, repetitions: int, n_questions: int, variants: list[str]) -> dict:
    """MMLU at a fixed batch size against batches capped at a number of padded tokens ("32:1024")."""
    questions = stratified_sample(load_mmlu_folder(data / "mmlu", "test"), n_questions, 0)
    settings = {name: tuple(None if part == "none" else int(part) for part in name.split(":")) for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    predictions = {}
    before = load()
    for _ in range(repetitions):  # in turn
        for name, (size, tokens) in settings.items():
            started = time.perf_counter()
            predictions[name] = evaluate_mmlu(lm.model, lm.tokenizer, questions, batch_size=size,
                                              max_batch_tokens=tokens, progress=False).predictions
            seconds[name].append(round(time.perf_counter() - started, 2))
            print(name, seconds[name][-1], flush=True)
    first = variants[0]
    return {"scoring_batch_tokens": {
        "seconds": {name: spread(times) for name, times in seconds.items()},
        "over_first": {name: ratio(seconds[name], seconds[first]) for name in settings},
        "same_predictions": all(predictions[name] == predictions[first] for name in settings),
        "load": [before, load()],
        "note": f"MMLU {n_questions} questions (0-shot, 80-650 tokens), batch_size:max_batch_tokens per variant "
                f"(none: no cap), in turn; over_first: each / {first}"}}


def generation_figure(lm, data: Path, n_prompts: int, new_tokens: int, sizes: list[int]) -> dict:
    tokenizer = lm.tokenizer
    goals = read_prompt_file(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal")[:n_prompts]
    prompts = encode_prompts(tokenizer, goals)
    greedy = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(lm.model, tokenizer),
                  max_new_tokens=new_tokens, progress=False)
    seconds: dict[str, float] = {}
    outputs: dict[str, list] = {}
    before = load()
    for size in sizes:  # plain and refilled in turn at each size
        for refill in (False, True):
            name = f"{'refill' if refill else 'plain'}_{size}"
            started = time.perf_counter()
            outputs[name] = generate(lm.model, prompts, batch_size=size, refill=refill, **greedy)
            seconds[name] = round(time.perf_counter() - started, 2)
            print(name, seconds[name], flush=True)
    lengths = [len(row) for row in outputs[f"plain_{sizes[0]}"]]
    identical = {str(size): outputs[f"plain_{size}"] == outputs[f"refill_{size}"] for size in sizes}
    best = min(seconds, key=seconds.get)
    return {"generation_batch_sizes": {
        "seconds": seconds, "best": best, "identical_tokens": identical, "load": [before, load()],
        "refill_over_plain": {str(s): round(seconds[f"refill_{s}"] / seconds[f"plain_{s}"], 4) for s in sizes},
        "response_tokens": {"median": sorted(lengths)[len(lengths) // 2], "min": min(lengths), "max": max(lengths)},
        "note": f"{n_prompts} JBB goals x up to {new_tokens} tokens, unsteered, one run per variant in turn"}}


def bake_figure(lm, data: Path, repetitions: int, batch_size: int) -> dict:
    adapter, tokenizer = lm.adapter, lm.tokenizer
    circuit = spread_circuit(adapter.n_layers, adapter.neurons_per_layer, adapter.n_layers - 9)
    steer = NeuronScale(adapter, circuit)
    goals = read_prompt_file(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal")[:16]
    prompts = encode_prompts(tokenizer, goals)
    greedy = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(lm.model, tokenizer),
                  max_new_tokens=16, batch_size=batch_size, refill=True, progress=False)

    def hooks():
        with steer.multiply(0.0):
            return generate(lm.model, prompts, **greedy)

    def baked():
        with baked_weights(adapter, circuit, 0.0):
            return generate(lm.model, prompts, **greedy)

    before = load()
    seconds: dict[str, list[float]] = {"hooks": [], "baked": []}
    tokens = {}
    for _ in range(repetitions):  # in turn
        for name, variant in (("hooks", hooks), ("baked", baked)):
            started = time.perf_counter()
            tokens[name] = variant()
            seconds[name].append(time.perf_counter() - started)
    return {"bake_vs_hooks": {**ratio(seconds["baked"], seconds["hooks"]), "same_tokens": tokens["hooks"] == tokens[
        "baked"],
                              "load": [before, load()],
                              "note": f"generation with a {circuit.k}-neuron circuit at m = 0 baked into down_proj / "
                                      f"by hooks, 16 JBB goals x 16 tokens, batch {batch_size}, refill on"}}


def fresh_process() -> None:
    """What a new process would not have: the discovery-set de-duplication a sweep's first job computes."""
    _deduplicate.cache_clear()


def job(hydra_model: str, scratch: Path, name: str, cache: Path, overrides: list[str]) -> tuple[float, dict]:
    job_config = compose_job([f"model={hydra_model}", f"cache_dir={cache}", *QUIET, *overrides])
    started = time.perf_counter()
    results = run(job_config, scratch / name)
    return time.perf_counter() - started, results.to_dict()


SWEEP_RECIPES = [["method.k_fraction=0.0005"], ["method.k_fraction=0.001"], ["method.k_fraction=0.0025"],
                 ["method=caa"]]
SWEEP_JOB = ["prompts.n_positive=32", "prompts.n_negative=32", "alphas=[0.0,1.0]", "max_new_tokens=32",
             "eval.refusal.n=16", "eval.mmlu.n=16", "eval.kl.n=16"]


def sweep_figure(hydra_model: str, scratch: Path, repetitions: int) -> dict:
    """Each repetition runs the 4-recipe multirun without, then with, the baseline cache, from fresh caches."""
    warm = scratch / "sweep_statistics"  # both variants find discovery cached: only the baseline differs
    job(hydra_model, scratch, "sweep_warm", warm, [*SWEEP_JOB, "alphas=[1.0]", "eval.refusal.n=1", "eval.mmlu.n=0",
                                                   "eval.kl.n=0"])
    seconds: dict[str, list[float]] = {"none": [], "cached": []}
    before = load()
    for repetition in range(repetitions):
        for variant, extra in (("none", ["reuse_baseline=false"]), ("cached", [])):
            cache = scratch / f"sweep_{variant}_{repetition}"
            shutil.copytree(warm, cache, ignore=shutil.ignore_patterns("baselines", "prefixes"))
            fresh_process()
            seconds[variant].append(sum(
                job(hydra_model, scratch, f"sweep_{variant}_{repetition}_{i}", cache, [*SWEEP_JOB, *recipe, *extra])[0]
                for i, recipe in enumerate(SWEEP_RECIPES)))
            print(variant, seconds[variant][-1], flush=True)
    return {"sweep_baseline_reuse": {
        **ratio(seconds["cached"], seconds["none"]), "seconds": {k: [round(v, 1) for v in vs] for k, vs in
                                                                 seconds.items()},
        "load": [before, load()],
        "note": "4 recipes (cna k_fraction 0.0005/0.001/0.0025, caa) x alphas {0, 1}: discovery 32 + 32 (cached "
                f"for both), JBB 16 x 32 tokens, MMLU 16, KL 16; baseline cache / none, {repetitions} repetitions "
                "in turn, each from fresh caches"}}


def end_to_end_figure(hydra_model: str, scratch: Path, scale: int) -> dict:
    sized = [f"prompts.n_positive={128 // scale}", f"prompts.n_negative={128 // scale}", "alphas=[0.0,0.5,1.0]",
             "max_new_tokens=64", f"eval.refusal.n={100 // scale}", f"eval.mmlu.n={200 // scale}",
             f"eval.kl.n={100 // scale}", "method=cna"]
    seconds, stages = {}, {}
    before = load()
    for variant, extra in (("old", [*OLD_PATH, "batch_size=16"]), ("new", [])):
        fresh_process()
        seconds[variant], results = job(hydra_model, scratch, f"e2e_{variant}", scratch / f"e2e_{variant}_cache",
                                        [*sized, *extra])
        stages[variant] = results["timings_s"]
        print(variant, seconds[variant], stages[variant], flush=True)
    cached_cache = scratch / "e2e_cached_cache"  # a later job of the sweep: the first one filled both stores
    for store in ("baselines", "prefixes"):
        shutil.copytree(scratch / "e2e_new_cache" / store, cached_cache / store)
    fresh_process()
    seconds["new_cached_baseline"], results = job(hydra_model, scratch, "e2e_cached", cached_cache, sized)
    stages["new_cached_baseline"] = results["timings_s"]
    return {"end_to_end_ratio": {
        "median": round(seconds["new"] / seconds["old"], 4), "min": round(seconds["new"] / seconds["old"], 4),
        "max": round(seconds["new"] / seconds["old"], 4),
        "cached_baseline": round(seconds["new_cached_baseline"] / seconds["old"], 4),
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "stages_s": stages, "load": [before, load()],
        "note": f"the end-to-end job at 1/{scale} scale (discovery {128 // scale} + {128 // scale} with an empty "
                f"statistics cache, alphas 0/0.5/1 x {100 // scale} JBB x 64 tokens, MMLU {200 // scale}, KL "
                f"{100 // scale}); new / old code path (old: no prefix reuse, no refill, no baseline cache, batch "
                "16), one run each in turn; cached_baseline: the new path with the alpha 0 point and the layer "
                "prefixes cached by the new job (a later job of the same sweep, same recipe)"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"), required="CNA_DATA_DIR" not in os.environ)
    parser.add_argument("--only", default="prefix,generation,bake,sweep,end_to_end")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--generation", default="64,32", help="prompts,new tokens for the batch-size figure")
    parser.add_argument("--prefix-sets", default="16,16", help="MMLU questions,KL prompts for the prefix figure")
    parser.add_argument("--sizes", default="16,32,64")
    parser.add_argument("--scoring", default="25:16:none,32:none,32:512,32:1024,32:2048",
                        help="MMLU questions, then batch_size:max_batch_tokens variants for the scoring figure")
    parser.add_argument("--bake-batch", type=int, default=16)
    parser.add_argument("--scale", type=int, default=4, help="end-to-end job at 1/scale of its prompt counts")
    parser.add_argument("--scratch", default="/tmp/cna-bench")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    data, scratch = Path(args.data_dir), Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if only & {"prefix", "generation", "bake", "scoring"}:
        lm = load_model(ModelSpec(name=args.model, local_name=args.model))
        if "prefix" in only:
            n_questions, n_kl = map(int, args.prefix_sets.split(","))
            save(args, prefix_figure(lm, data, scratch, args.repetitions, n_questions, n_kl))
        if "scoring" in only:
            n_questions, *variants = args.scoring.split(",")
            n_questions, first = n_questions.split(":", 1)
            save(args, scoring_figure(lm, data, args.repetitions, int(n_questions), [first, *variants]))
        if "generation" in only:
            n_prompts, new_tokens = map(int, args.generation.split(","))
            save(args, generation_figure(lm, data, n_prompts, new_tokens, [int(s) for s in args.sizes.split(",")]))
        if "bake" in only:
            save(args, bake_figure(lm, data, args.repetitions, args.bake_batch))
        del lm
    if "sweep" in only:
        save(args, sweep_figure(HYDRA_MODEL[args.model], scratch, args.repetitions))
    if "end_to_end" in only:
        save(args, end_to_end_figure(HYDRA_MODEL[args.model], scratch, args.scale))


def save(args, figures: dict) -> None:
    """Each figure goes into the results file as soon as it is measured."""
    for name, value in figures.items():
        print(name, json.dumps(value), flush=True)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads()}
    for name, value in figures.items():
        value = {**value, **stamp}
        saved.setdefault("models", {}).setdefault(args.model, {})[name] = value
        if saved.get("model", args.model) == args.model:
            saved[name] = value
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
