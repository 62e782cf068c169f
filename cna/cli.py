"""`python -m cna discover`: find a circuit, write circuit.json, show generations unsteered vs steered."""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import textwrap
import time
from pathlib import Path

from cna import api
from cna.data import deduplicate, encode_prompts, read_prompt_file
from cna.discovery import DISCOVERY_TOKEN_BUDGET
from cna.errors import CnaError
from cna.generation import eos_token_ids, generate
from cna.methods.cna import DEFAULT_REFUSAL_STARTS, UniversalConfig
from cna.models import ModelSpec, load_model
from cna.pipeline import discovery_overlap
from cna.run_folder import CIRCUIT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cna", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    discover = commands.add_parser("discover", help="discover a circuit and compare generations at m=1 and m")
    model = discover.add_argument_group("model")
    model.add_argument("--model", required=True, help="hub id, e.g. Qwen/Qwen2.5-Coder-0.5B-Instruct")
    model.add_argument("--local-name", help="folder name under $CNA_MODEL_CACHE, tried before the hub")
    model.add_argument("--path", help="an explicit model folder, tried first")
    model.add_argument("--dtype", default="auto")
    model.add_argument("--device", default="auto")
    prompts = discover.add_argument_group("prompts")
    prompts.add_argument("--positive", required=True, help="file of prompts showing the behaviour")
    prompts.add_argument("--positive-column", default="instruction")
    prompts.add_argument("--negative", required=True, help="file of prompts without it")
    prompts.add_argument("--negative-column", default="instruction")
    prompts.add_argument("--n", type=int, default=64, help="prompts drawn (seeded) from each set")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--template", default="chat", choices=["chat", "raw"])
    prompts.add_argument("--dedup-against", help="evaluation file: drop discovery prompts that copy its prompts")
    prompts.add_argument("--dedup-column", default="goal")
    prompts.add_argument("--dedup-threshold", type=float, default=0.8, help="near-duplicate similarity")
    selection = discover.add_argument_group("selection")
    selection.add_argument("--k-fraction", type=float, default=0.001)
    selection.add_argument("--k", type=int, help="an absolute neuron count (overrides --k-fraction)")
    selection.add_argument("--sign", default="abs", choices=["abs", "positive", "negative"])
    selection.add_argument("--score", default="delta", choices=["delta", "projection", "attribution"],
                           help="what ranks the neurons: the paper's activation difference, its projection on the "
                                "residual direction, or attribution patching (cna/attribution.py)")
    selection.add_argument("--refusal-starts", nargs="+", metavar="TEXT",
                           help="attribution: the response starts whose first tokens' log-odds is the metric "
                                "(default: the method config's refusal starts)")
    selection.add_argument("--top-fraction", type=float, default=0.001, help="universal filter: top share")
    selection.add_argument("--threshold", type=float, default=0.8, help="universal filter: share of prompts")
    selection.add_argument("--no-filter", action="store_true", help="skip the universal-neuron filter")
    selection.add_argument("--batch-size", type=int, default=16)
    selection.add_argument("--batch-tokens", type=int, default=DISCOVERY_TOKEN_BUDGET,
                           help="most padded tokens per discovery batch (bounds activation memory)")
    selection.add_argument("--cache-dir", help="statistics cache folder, shared with launch.py's cache_dir")
    show = discover.add_argument_group("side-by-side generations")
    show.add_argument("--show", help="file of prompts to generate for (default: the positive set)")
    show.add_argument("--show-column", default="goal")
    show.add_argument("--show-n", type=int, default=4)
    show.add_argument("--multiplier", type=float, default=0.0, help="m for the steered column (0 ablates)")
    show.add_argument("--max-new-tokens", type=int, default=48)
    discover.add_argument("--out", default="outputs/discover", help="folder for circuit.json")
    return parser


def _sample(prompts: list[str], n: int, seed: int) -> list[str]:
    return prompts if n >= len(prompts) else random.Random(seed).sample(prompts, n)


def discover(args: argparse.Namespace) -> None:
    # Every input file is read before the model loads, so a typo fails in a second, not after a minute.
    method = dict(k_fraction=args.k_fraction, k=args.k, sign=args.sign, score=args.score,
                  universal=UniversalConfig(enabled=not args.no_filter, top_fraction=args.top_fraction,
                                            threshold=args.threshold),
                  refusal_starts=list(args.refusal_starts or DEFAULT_REFUSAL_STARTS))
    api.cna_config(**method)  # checked before anything is read or loaded
    positive = read_prompt_file(args.positive, args.positive_column)
    negative = read_prompt_file(args.negative, args.negative_column)
    removed, overlap = {"positive": 0, "negative": 0}, {}
    if args.dedup_against:
        evaluation = read_prompt_file(args.dedup_against, args.dedup_column)
        for name, prompts in (("positive", positive), ("negative", negative)):
            kept = deduplicate(prompts, evaluation, args.dedup_threshold)
            print(f"{name} set: removed {len(kept.exact)} exact and {len(kept.near)} near duplicates of "
                  f"{args.dedup_against}")
            prompts[:] = kept.kept
            removed[name] = kept.removed
    positive = _sample(positive, args.n, args.seed)
    negative = _sample(negative, args.n, args.seed)
    if args.dedup_against:
        overlap = discovery_overlap(positive + negative, {"dedup_against": evaluation}, args.dedup_threshold)
    shown = read_prompt_file(args.show, args.show_column) if args.show else positive
    shown = _sample(shown, args.show_n, args.seed)
    started = time.perf_counter()
    loaded = load_model(ModelSpec(name=args.model, local_name=args.local_name, path=args.path, dtype=args.dtype,
                                  device=args.device))
    tokenizer, adapter = loaded.tokenizer, loaded.adapter
    print(f"model {loaded.source}: {adapter.n_layers} layers x {adapter.neurons_per_layer} neurons "
          f"({adapter.model_type}), loaded in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    circuit = api.discover(loaded.model, tokenizer, positive, negative, template=args.template,  # as launch.py's
                           batch_size=args.batch_size, batch_tokens=args.batch_tokens, cache_dir=args.cache_dir,
                           **method)
    circuit.model = args.model
    circuit.prompts.update(duplicates_removed=removed, in_sample=any(overlap.values()), overlap=overlap)
    path = circuit.save(Path(args.out) / CIRCUIT)
    occupied = {layer: count for layer, count in circuit.layer_counts.items() if count}
    print(f"circuit: k = {circuit.k} of {adapter.total_neurons} neurons, {circuit.universal_removed} universal "
          f"removed, found in {time.perf_counter() - started:.1f} s -> {path}")
    print("layer counts: " + ", ".join(f"L{layer}: {count}" for layer, count in occupied.items()))

    encoded = encode_prompts(tokenizer, shown, args.template)
    greedy = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(loaded.model, tokenizer),
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    plain = generate(loaded.model, encoded, desc="m = 1", **greedy)
    with api.steer(loaded.model, circuit, multiplier=args.multiplier):
        steered = generate(loaded.model, encoded, desc=f"m = {args.multiplier:g}", **greedy)
    _print_side_by_side(shown, [tokenizer.decode(t) for t in plain], [tokenizer.decode(t) for t in steered],
                        f"m = {args.multiplier:g}")


def _print_side_by_side(prompts: list[str], left: list[str], right: list[str], right_title: str) -> None:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    rule = "-" * (2 * width + 3)
    for prompt, a, b in zip(prompts, left, right, strict=True):
        print(rule)
        print(textwrap.shorten(f"PROMPT: {prompt}", 2 * width + 3))
        columns = [textwrap.wrap(" ".join(text.split()), width) or [""] for text in (a, b)]
        print(f"{'m = 1 (unchanged)':<{width}} | {right_title}")
        for row in range(max(len(c) for c in columns)):
            cells = [c[row] if row < len(c) else "" for c in columns]
            print(f"{cells[0]:<{width}} | {cells[1]}")
    print(rule)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        discover(args)
    except CnaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
