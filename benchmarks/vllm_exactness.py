"""Exactness of the vLLM engine against the transformers engine, method by method (issue 26).

    .venv-vllm/bin/python benchmarks/vllm_exactness.py [--goals 100] [--tokens 48] [--mmlu 200] [--kl 100]

On qwen2.5-coder-0.5b-instruct in float32: discovery once per method on transformers, then both engines in turn
(one process, the same tokens in, the same tokenizer out) at alpha 1:
- refusal rate on the JBB goals (greedy, `--tokens` new tokens), and how many completions are identical;
- MMLU accuracy with its 95% interval, and KL(steered || unsteered) on harmless prompts with a bootstrap interval;
plus the alpha = 0 row: the vLLM engine's steering at alpha 0 against plain vLLM (no hooks), token for token.
Prints a markdown table; `--out` writes every value and the differing completions as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from cna.cache import StatisticsCache
from cna.config import compose_job
from cna.engines.hf import HfEngine
from cna.engines.vllm import VllmEngine
from cna.evaluation.evaluator import Evaluator
from cna.evaluation.kl import kl_divergence
from cna.models import load_model
from cna.pipeline import discover, job_statistics, prepare_data, session_for, strength_points
from cna.validation import validate

METHODS = {  # row name -> overrides of the job (recipe=best: the recipe RESULTS.md found on this model)
    "cna scale all": ["recipe=best"],
    "cna scale prompt": ["recipe=best", "method.positions=prompt"],
    "cna scale generated": ["recipe=best", "method.positions=generated"],
    "cna mean all": ["recipe=best", "method.mode=mean"],
    "random scale all": ["recipe=best_random"],
    "random mean all": ["recipe=best_random", "method.mode=mean"],
    "caa": ["method=caa"],
    "direction": ["method=direction"],
}


def kl_interval(steered: torch.Tensor, unsteered: torch.Tensor, seed: int = 0, draws: int = 2000) -> list[float]:
    """Per-prompt KL(steered || unsteered), its mean and a 95% bootstrap interval over prompts."""
    p = steered.double()
    per_prompt = (p.exp() * (p - unsteered.double())).sum(-1).clamp(min=0)
    generator = torch.Generator().manual_seed(seed)
    means = per_prompt[torch.randint(len(per_prompt), (draws, len(per_prompt)), generator=generator)].mean(-1)
    return [float(per_prompt.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--mmlu", type=int, default=200)
    parser.add_argument("--kl", type=int, default=100)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine (vLLM's CUDA build)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cuda-graphs", action="store_true", help="engine.enforce_eager=false (weight-edit methods)")
    args = parser.parse_args()
    base = ["model=qwen_coder_0_5b", f"model.dtype={args.dtype}", f"model.device={args.device}",
            f"engine.enforce_eager={str(not args.cuda_graphs).lower()}", "logger=none", "engine=vllm",
            "engine.kv_cache_gib=2", f"eval.refusal.n={args.goals}", "eval.over_refusal.jbb_benign.n=0",
            "eval.over_refusal.xstest_safe.n=0", f"eval.mmlu.n={args.mmlu}", "eval.kl.n=0",
            f"max_new_tokens={args.tokens}", "alphas=[0.0,1.0]"]
    first = compose_job(base + METHODS[args.methods[0]])
    kl_prompts = next(m for m in prepare_data(compose_job(base + [f"eval.kl.n={args.kl}"])).metrics
                      if m.name == "kl").prompts
    started = time.perf_counter()
    lm = load_model(first.model.spec())
    engines = {"hf": HfEngine(lm.model, lm.tokenizer, refill=True), "vllm": VllmEngine.start(first.engine, lm, first)}
    loaded = time.perf_counter() - started
    sessions, evaluators, references = {}, {}, {}
    for name, engine in engines.items():  # each engine has its own metric objects (MMLU, refusal, quality)
        sessions[name] = session_for(first, lm, engine=engine)
        sessions[name].progress = False
        evaluators[name] = Evaluator(sessions[name], prepare_data(first).metrics)
        references[name] = sessions[name].next_token_logprobs(sessions[name].encode(kl_prompts), "kl")
    refusal = next(m for m in prepare_data(first).metrics if m.name == "refusal")
    goals = refusal.prompts
    rows, seconds = {}, {}

    # alpha = 0: the engine's steering at strength 0 against plain vLLM, and the two engines unsteered.
    vllm_session = sessions["vllm"]
    plain = vllm_session.generate(goals, "plain")
    statistics = job_statistics(first, lm, StatisticsCache(first.cache.dir))
    for method_name in args.methods:
        job = compose_job(base + METHODS[method_name])
        method = validate(job)
        intervention, _found = discover(method, statistics, prepare_data(job).sets, model_name=job.model.name)
        steered = {"hf": intervention, "vllm": engines["vllm"].intervention(intervention)}
        alpha, multiplier = strength_points(job, method)[-1]
        if "alpha0" not in rows:
            with engines["vllm"].steering(steered["vllm"], 0.0, None if multiplier is None else 1.0):
                at_zero = vllm_session.generate(goals, "alpha 0")
            hf_plain = sessions["hf"].generate(goals, "hf plain")
            rows["alpha0"] = {"method": method_name, "identical_to_plain_vllm": sum(
                a == b for a, b in zip(at_zero, plain, strict=True)), "n": len(goals),
                "hf_vs_vllm_unsteered_identical": sum(a == b for a, b in zip(hf_plain, plain, strict=True))}
            print(json.dumps(rows["alpha0"]), flush=True)
        measured = {}
        for name, engine in engines.items():
            clock = time.perf_counter()
            point, records, _timings = evaluators[name].point(alpha, multiplier,
                                                              engine.steering(steered[name], alpha, multiplier))
            with engine.steering(steered[name], alpha, multiplier):
                logprobs = sessions[name].next_token_logprobs(sessions[name].encode(kl_prompts), "kl")
            seconds[f"{method_name} {name}"] = round(time.perf_counter() - clock, 1)
            measured[name] = {"refusal": point.refusal_rate, "refusal_ci95": point.refusal_ci95,
                              "quality": point.quality, "mmlu": point.value("mmlu_accuracy"),
                              "mmlu_ci95": point.value("mmlu_ci95"), "kl": kl_interval(logprobs, references[name]),
                              "kl_metric": kl_divergence(logprobs, references[name]),
                              "responses": [r["response"] for r in records if r["set"] == refusal.set_name]}
        hf, vllm = measured["hf"], measured["vllm"]
        differing = [{"goal": goal, "hf": a, "vllm": b} for goal, a, b in
                     zip(goals, hf["responses"], vllm["responses"], strict=True) if a != b]
        rows[method_name] = {
            "alpha": alpha, "multiplier": multiplier,
            "weights_or_hooks": "weights" if engines["vllm"].weight_edit(steered["vllm"], alpha, multiplier)
            else "hooks",
            **{f"{k}_{name}": v for name in ("hf", "vllm") for k, v in measured[name].items() if k != "responses"},
            "identical": len(goals) - len(differing), "n": len(goals), "differing": differing}
        print(json.dumps({k: v for k, v in rows[method_name].items() if k != "differing"}), flush=True)
    print_table(rows, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "seconds": seconds,
                                              "load_s": round(loaded, 1), "load": os.getloadavg()}, indent=1))


def print_table(rows: dict, args) -> None:
    print(f"\nqwen2.5-coder-0.5b-instruct, float32, {args.goals} JBB goals x {args.tokens} tokens, MMLU {args.mmlu}, "
          f"KL {args.kl}; alpha 1 (m = 0)\n")
    print("| method | vLLM steers by | refusal hf | refusal vllm | diff | identical | MMLU hf [95%] | MMLU vllm | "
          "KL hf [95%] | KL vllm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if name == "alpha0":
            continue
        mmlu_in = row["mmlu_ci95_hf"][0] <= row["mmlu_vllm"] <= row["mmlu_ci95_hf"][1]
        kl_in = row["kl_hf"][1] <= row["kl_vllm"][0] <= row["kl_hf"][2]
        print(f"| {name} | {row['weights_or_hooks']} | {row['refusal_hf']:.2f} | {row['refusal_vllm']:.2f} | "
              f"{row['refusal_vllm'] - row['refusal_hf']:+.2f} | {row['identical']}/{row['n']} | "
              f"{row['mmlu_hf']:.3f} [{row['mmlu_ci95_hf'][0]:.3f}, {row['mmlu_ci95_hf'][1]:.3f}] | "
              f"{row['mmlu_vllm']:.3f} ({'in' if mmlu_in else 'OUT'}) | {row['kl_hf'][0]:.4f} [{row['kl_hf'][1]:.4f}, "
              f"{row['kl_hf'][2]:.4f}] | {row['kl_vllm'][0]:.4f} ({'in' if kl_in else 'OUT'}) |")
    zero = rows.get("alpha0")
    if zero:
        print(f"\nalpha 0: {zero['identical_to_plain_vllm']}/{zero['n']} completions identical to plain vLLM "
              f"(no hooks); unsteered, transformers and vLLM agree on {zero['hf_vs_vllm_unsteered_identical']}/"
              f"{zero['n']}")


if __name__ == "__main__":
    main()
