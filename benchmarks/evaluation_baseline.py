"""Baseline evaluation of an unsteered model: refusal on JBB, over-refusal, quality, MMLU, with timings.

    CNA_DATA_DIR=../shared/data .venv/bin/python benchmarks/evaluation_baseline.py \
        --local-name qwen2.5-coder-0.5b-instruct --out outputs/baseline

Writes generations.jsonl (one line per prompt, with its set) and results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cna.data import encode_prompts, read_prompt_file
from cna.evaluation.mmlu import evaluate_mmlu, load_mmlu_folder, stratified_sample
from cna.evaluation.responses import evaluate_responses
from cna.generation import eos_token_ids, generate
from cna.io import write_json_atomic
from cna.models import ModelSpec, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-name", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"), required="CNA_DATA_DIR" not in os.environ)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mmlu", type=int, default=1000, help="questions, stratified by subject (0: skip)")
    parser.add_argument("--sets", default="jbb_harmful,jbb_benign,xstest_safe", help="comma-separated; '' for none")
    parser.add_argument("--out", default="outputs/baseline")
    args = parser.parse_args()

    data = Path(args.data_dir)
    sets = {
        "jbb_harmful": lambda: read_prompt_file(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal"),
        "jbb_benign": lambda: read_prompt_file(data / "jbb_behaviors" / "benign-behaviors.csv", "goal"),
        "xstest_safe": lambda: read_prompt_file(data / "xstest" / "xstest_prompts.csv", "prompt", {"label": "safe"}),
    }
    loaded = load_model(ModelSpec(name=args.local_name, local_name=args.local_name))
    tokenizer, out = loaded.tokenizer, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    greedy = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(loaded.model, tokenizer),
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results, timings = {}, {}
    with (out / "generations.jsonl").open("w", encoding="utf-8") as lines:
        for name in filter(None, args.sets.split(",")):
            prompts = sets[name]()
            started = time.perf_counter()
            tokens = generate(loaded.model, encode_prompts(tokenizer, prompts), desc=name, **greedy)
            timings[name] = round(time.perf_counter() - started, 1)
            evaluation = evaluate_responses(prompts, [tokenizer.decode(t, skip_special_tokens=True) for t in tokens])
            results[name] = {"refusal_rate": evaluation.refusal.rate, "refusal_ci95": evaluation.refusal.ci95,
                             "refused": evaluation.refusal.refused, "n_prompts": evaluation.refusal.n,
                             "quality": evaluation.quality.mean, "quality_ci95": evaluation.quality.ci95,
                             "degenerate_rate": evaluation.quality.degenerate_rate}
            for record in evaluation.records:
                lines.write(json.dumps({"set": name, "alpha": 0.0, **record}, ensure_ascii=False) + "\n")
            print(name, json.dumps(results[name]), f"{timings[name]} s", flush=True)
    if args.mmlu:
        questions = stratified_sample(load_mmlu_folder(data / "mmlu", "test"), args.mmlu, seed=0)
        started = time.perf_counter()
        mmlu = evaluate_mmlu(loaded.model, tokenizer, questions, batch_size=8)
        timings["mmlu"] = round(time.perf_counter() - started, 1)
        results["mmlu"] = {"accuracy": mmlu.accuracy, "ci95": mmlu.ci95, "n": mmlu.n, "k_shot": 0}
        print("mmlu", json.dumps(results["mmlu"]), f"{timings['mmlu']} s", flush=True)
    write_json_atomic(out / "results.json", {"model": args.local_name, "max_new_tokens": args.max_new_tokens,
                                             "results": results, "timings_s": timings})


if __name__ == "__main__":
    main()
