"""`vs_paper_code`: the paper's public code (NousResearch/neural-steering) against ours on the same work.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CNA_DATA_DIR=../shared/data CNA_MODEL_CACHE=~/.cache/cna-models \\
        PYTHONPATH=. .venv/bin/python benchmarks/vs_paper_code.py --paper-code /tmp/neural-steering \\
        --goals 16,100 --repetitions 2,1 --out vs_paper.json

The work, identical for both codes: qwen2.5-coder-0.5b-instruct (a local folder) on CPU in float32, discovery
from the first `--n` of a seeded `random.Random(seed).sample` of harmful_train / harmless_train (field
"instruction"), a circuit of 0.1% of the MLP neurons, then greedy generation of the first N JBB goals (column
"goal") x `--max-new-tokens` with the circuit scaled by m = 0 at every position.

- Paper: a checkout of its repository (fetched into a scratch folder outside this one, never copied here),
  imported from `--paper-code`. Discovery is `NeuronSteerer.find_feature(positive=..., negative=..., top_k=k)`
  (its contrastive mode: one forward per prompt, activations at the last token); generation is
  `NeuronSteerer.steer(goal, circuit=..., multiplier=m, max_new_tokens=...)` per goal (`model.generate` at
  batch 1 under its down_proj pre-hooks). Its constructor is called with device "cpu" and dtype float32;
  its universal-neuron detection (run by the constructor, unused by contrastive discovery) is timed apart.
- Ours: `cna.pipeline.discover_method` (discovery with the universal filter, as the pipeline runs it), then
  `cna.generation.generate` under `NeuronScale(adapter, circuit).multiply(m)` with the defaults of
  conf/config.yaml (batch 32, refilled rows). Each timed discovery starts from a fresh statistics cache that
  holds only the universal filter's diverse-prompt statistics (62 packaged prompts; they depend on the model
  alone, so a sweep computes them once), and computes the two contrastive sets' statistics.

Universal-neuron detection is a per-model step in both codes, so it is timed once, apart, for each
(`load_seconds.*_universal_detection`) and is not in the per-run totals: the paper's constructor runs it
(10 prompts; its contrastive discovery then ignores the result), ours computes the diverse statistics
(`cna.pipeline.universal_statistics`). `ratio_with_universal_detection` adds each code's detection time
to its median total.

Both models are loaded once (not timed in the ratios) and each runs one short forward before timing, so
lazily mapped weights are paged in. For every N, repetitions alternate paper, ours, paper, ours, ... in
one process with `torch.set_num_threads(--threads)`. Times include tokenising and decoding on both sides.
Reported: seconds per stage and the ratio paper / ours (discovery, generation, total) per run and the
median per N, load averages, and checks that the outputs compare: the circuits' overlap, the share of
identical completions, refusal counts by our keyword classifier, and the first steered completion of each.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cna.cache import StatisticsCache
from cna.config import compose_job
from cna.data import encode_prompts, read_prompt_file
from cna.evaluation.keywords import KeywordRefusalClassifier
from cna.generation import eos_token_ids, generate
from cna.interventions import NeuronScale
from cna.methods import make_method
from cna.methods.base import DiscoverySets
from cna.models import load_model, model_cache
from cna.pipeline import discover, job_statistics

STAGES = ("discovery", "generation", "total")


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-code", default="/tmp/neural-steering", help="checkout of NousResearch/neural-steering")
    parser.add_argument("--model-dir", help="local model folder (default: $CNA_MODEL_CACHE/<local name>)")
    parser.add_argument("--local-name", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--model-config", default="qwen_coder_0_5b", help="conf/model entry for ours")
    parser.add_argument("--data-dir", default=os.environ.get("CNA_DATA_DIR"))
    parser.add_argument("--n", type=int, default=32, help="discovery prompts per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goals", type=_int_list, default=[16, 100], help="comma list of JBB goal counts")
    parser.add_argument("--repetitions", type=_int_list, default=[2, 1],
                        help="comma list: repetitions per goal count (one value applies to all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--multiplier", type=float, default=0.0)
    parser.add_argument("--k-fraction", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="vs_paper.json")
    return parser


class Timer:
    """Seconds of each stage and the load average at the start and end of a variant's run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.load = {"start": list(os.getloadavg())}

    def stage(self, name: str, work):
        started = time.perf_counter()
        result = work()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        return result

    def done(self) -> dict:
        self.seconds["total"] = round(self.seconds["discovery"] + self.seconds["generation"], 2)
        self.load["end"] = list(os.getloadavg())
        return {"seconds": self.seconds, "loadavg": self.load}


class PaperCode:
    """The paper's NeuronSteerer, driven through its own high-level API."""

    def __init__(self, checkout: Path, model_dir: Path):
        sys.path.insert(0, str(checkout))
        from neuron_steer import core  # importable only once its checkout is on the path

        started = time.perf_counter()
        # device/dtype: its defaults are "cuda" and bfloat16; the blacklist step is timed apart below.
        self.steerer = core.NeuronSteerer(str(model_dir), device="cpu", dtype=torch.float32, auto_blacklist=False)
        self.load_s = time.perf_counter() - started
        started = time.perf_counter()
        # The same call and settings as its constructor's auto_blacklist step (unused by contrastive discovery).
        self.steerer.blacklist |= core.detect_universal_neurons(self.steerer.model, self.steerer.tokenizer, "cpu",
                                                                n_prompts=10, top_k=20, threshold_fraction=0.8)
        self.universal_s = time.perf_counter() - started
        self.attention = self.steerer.model.config._attn_implementation

    def discover(self, positive: list[str], negative: list[str], k: int):
        return self.steerer.find_feature(positive=positive, negative=negative, top_k=k)

    def generate(self, goals: list[str], circuit, multiplier: float, max_new_tokens: int) -> list[str]:
        return [self.steerer.steer(goal, circuit=circuit, multiplier=multiplier, max_new_tokens=max_new_tokens)
                for goal in goals]

    @staticmethod
    def neurons(circuit) -> set[tuple[int, int]]:
        return {(index.layer, index.neuron) for index in circuit.neurons}


class OurCode:
    """cna's discovery path (as launch.py and `python -m cna discover` run it) and batched generation."""

    def __init__(self, model_name: str, model_dir: Path, k_fraction: float, seed: int):
        self.job = compose_job(["method=cna", "logger=none", f"model={model_name}", f"model.path={model_dir}",
                                "model.device=cpu", "model.dtype=float32", f"method.k_fraction={k_fraction}",
                                f"seed={seed}"])
        self.method = make_method(self.job.method)
        started = time.perf_counter()
        self.lm = load_model(self.job.model.spec())
        self.load_s = time.perf_counter() - started
        self.attention = self.lm.model.config._attn_implementation
        tokenizer = self.lm.tokenizer
        self.greedy = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(self.lm.model, tokenizer),
                           batch_size=self.job.batch_size, refill=self.job.refill_generation, progress=False)
        self.model_level = Path(tempfile.mkdtemp(prefix="cna-vs-paper-"))
        atexit.register(shutil.rmtree, self.model_level, ignore_errors=True)  # also when a run dies halfway
        started = time.perf_counter()
        self.method.filter_statistics(job_statistics(self.job, self.lm, StatisticsCache(self.model_level)))
        self.universal_s = time.perf_counter() - started

    def discover(self, positive: list[str], negative: list[str]):
        """A fresh cache seeded with the model-level statistics only: the contrastive sets are computed."""
        with tempfile.TemporaryDirectory(prefix="cna-vs-paper-job-") as folder:
            shutil.copytree(self.model_level, folder, dirs_exist_ok=True)
            cache = StatisticsCache(folder)
            circuit = discover(self.method, job_statistics(self.job, self.lm, cache), DiscoverySets(positive, negative),
                               model_name=self.job.model.name)[1]
        if (cache.hits, cache.misses) != (1, 2):
            raise RuntimeError(f"expected the diverse statistics from the cache and two computed sets, got "
                               f"{cache.hits} hits and {cache.misses} misses")
        return circuit

    def generate(self, goals: list[str], circuit, multiplier: float, max_new_tokens: int) -> list[str]:
        encoded = encode_prompts(self.lm.tokenizer, goals, self.job.model.template)
        with NeuronScale(self.lm.adapter, circuit).multiply(multiplier):
            tokens = generate(self.lm.model, encoded, max_new_tokens=max_new_tokens, **self.greedy)
        return [self.lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]

    @staticmethod
    def neurons(circuit) -> set[tuple[int, int]]:
        return {(neuron.layer, neuron.index) for neuron in circuit.neurons}


def warm_up(model, tokenizer) -> None:
    """One short forward: pages in lazily mapped weights so that neither code pays it inside a timed stage."""
    with torch.inference_mode():
        model(**tokenizer("Hello there", return_tensors="pt"))


def run_variant(code, name: str, positive, negative, goals, k: int, args) -> tuple[dict, set, list[str]]:
    timer = Timer()
    if name == "paper":
        circuit = timer.stage("discovery", lambda: code.discover(positive, negative, k))
    else:
        circuit = timer.stage("discovery", lambda: code.discover(positive, negative))
    texts = timer.stage("generation", lambda: code.generate(goals, circuit, args.multiplier, args.max_new_tokens))
    result = timer.done()
    result["k"] = len(circuit.neurons)
    print(f"  {name}: discovery {result['seconds']['discovery']:.1f} s, generation "
          f"{result['seconds']['generation']:.1f} s, total {result['seconds']['total']:.1f} s "
          f"(k = {result['k']}, load {result['loadavg']['start'][0]:.2f} -> {result['loadavg']['end'][0]:.2f})",
          flush=True)
    return result, code.neurons(circuit), texts


def compare(paper: tuple, ours: tuple, classifier: KeywordRefusalClassifier) -> dict:
    (_, paper_neurons, paper_texts), (_, our_neurons, our_texts) = paper, ours
    return {
        "circuit_overlap": len(paper_neurons & our_neurons),
        "paper_layers": sorted({layer for layer, _ in paper_neurons}),
        "our_layers": sorted({layer for layer, _ in our_neurons}),
        "identical_completions": sum(a.strip() == b.strip() for a, b in zip(paper_texts, our_texts, strict=True)),
        "refusals": {"paper": sum(map(classifier, paper_texts)), "ours": sum(map(classifier, our_texts))},
        "first_completion": {"goal_0_paper": paper_texts[0], "goal_0_ours": our_texts[0]},
    }


def summarise(runs: list[dict], universal_s: dict[str, float]) -> dict:
    """Medians per goal count; `universal_s`: each code's one-off universal-neuron detection, in seconds."""
    summary = {}
    for goals in sorted({run["goals"] for run in runs}):
        chosen = [run for run in runs if run["goals"] == goals]
        entry = {"repetitions": len(chosen)}
        for variant in ("paper", "ours"):
            entry[variant] = {stage: statistics.median(run[variant]["seconds"][stage] for run in chosen)
                              for stage in STAGES}
        entry["ratio"] = {stage: round(statistics.median(run["ratio"][stage] for run in chosen), 3)
                          for stage in STAGES}
        entry["ratio_with_universal_detection"] = round(
            (entry["paper"]["total"] + universal_s["paper"]) / (entry["ours"]["total"] + universal_s["ours"]), 3)
        summary[str(goals)] = entry
    return summary


def main() -> None:
    args = _parser().parse_args()
    if not args.data_dir:
        raise SystemExit("--data-dir: expected the data folder (or set CNA_DATA_DIR)")
    repetitions = args.repetitions * len(args.goals) if len(args.repetitions) == 1 else args.repetitions
    if len(repetitions) != len(args.goals):
        raise SystemExit(f"--repetitions: expected 1 or {len(args.goals)} values, got {args.repetitions}")
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir).expanduser() if args.model_dir else model_cache() / args.local_name
    checkout = Path(args.paper_code).expanduser()
    if not (checkout / "neuron_steer" / "core.py").is_file():
        raise SystemExit(f"--paper-code: expected a checkout of NousResearch/neural-steering, got '{checkout}'")
    load_start = list(os.getloadavg())

    data = Path(args.data_dir)
    splits = data / "harmful_harmless_splits"
    positive, negative = (random.Random(args.seed).sample(read_prompt_file(splits / f"{name}_train.json",
                                                                           "instruction"), args.n)
                          for name in ("harmful", "harmless"))
    all_goals = read_prompt_file(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal")

    ours = OurCode(args.model_config, model_dir, args.k_fraction, args.seed)
    paper = PaperCode(checkout, model_dir)
    for code in (paper.steerer, ours.lm):
        warm_up(code.model, code.tokenizer)
    adapter = ours.lm.adapter
    k = max(1, round(args.k_fraction * adapter.total_neurons))
    print(f"model {model_dir}: {adapter.n_layers} x {adapter.neurons_per_layer} neurons, k = {k}; load "
          f"paper {paper.load_s:.1f} s (+ universal detection {paper.universal_s:.1f} s), ours {ours.load_s:.1f} s "
          f"(+ universal detection {ours.universal_s:.1f} s); "
          f"attention paper {paper.attention}, ours {ours.attention}; threads {torch.get_num_threads()}", flush=True)

    classifier = KeywordRefusalClassifier()
    runs = []
    for n_goals, count in zip(args.goals, repetitions, strict=True):
        goals = all_goals[:n_goals]
        for repetition in range(count):
            print(f"{n_goals} goals, repetition {repetition + 1} of {count}", flush=True)
            paper_run = run_variant(paper, "paper", positive, negative, goals, k, args)
            our_run = run_variant(ours, "ours", positive, negative, goals, k, args)
            ratio = {stage: round(paper_run[0]["seconds"][stage] / our_run[0]["seconds"][stage], 3)
                     for stage in STAGES}
            runs.append({"goals": n_goals, "repetition": repetition + 1, "paper": paper_run[0], "ours": our_run[0],
                         "ratio": ratio, "outputs": compare(paper_run, our_run, classifier)})
            print(f"  ratio paper / ours: {ratio}", flush=True)
            print(f"  outputs: {json.dumps(runs[-1]['outputs'], ensure_ascii=False)}", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(_report(args, k, paper, ours, load_start, runs), indent=2) + "\n")
    report = _report(args, k, paper, ours, load_start, runs)
    report["loadavg"]["end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


def _report(args, k: int, paper: PaperCode, ours: OurCode, load_start: list[float], runs: list[dict]) -> dict:
    return {
        "figure": "vs_paper_code",
        "definition": "time of NousResearch/neural-steering / time of cna, same discovery prompts, goals and "
                      "settings, run in turn in one process",
        "settings": {"model": args.local_name, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
                     "discovery_prompts_per_set": args.n, "seed": args.seed, "k": k, "k_fraction": args.k_fraction,
                     "max_new_tokens": args.max_new_tokens, "multiplier": args.multiplier,
                     "ours": {"batch_size": ours.cfg.batch_size, "refill": ours.cfg.refill_generation,
                              "discovery_batch_tokens": ours.cfg.discovery_batch_tokens,
                              "universal_filter": ours.cfg.method.universal.enabled, "attention": ours.attention},
                     "paper": {"batch_size": 1, "attention": paper.attention, "excluded_layers": [0, 1]}},
        "load_seconds": {"paper": round(paper.load_s, 2), "paper_universal_detection": round(paper.universal_s, 2),
                         "ours": round(ours.load_s, 2), "ours_universal_detection": round(ours.universal_s, 2)},
        "loadavg": {"start": load_start},
        "runs": runs,
        "summary": summarise(runs, {"paper": paper.universal_s, "ours": ours.universal_s}),
    }


if __name__ == "__main__":
    main()
