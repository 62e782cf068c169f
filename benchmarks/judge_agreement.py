"""Refusal judges against hand labels: agreement and Cohen's kappa, and judging time per 100 responses.

    python benchmarks/judge_agreement.py [--labels tests/data/qwen_refusal_labels.jsonl] [--judges yesno strongreject]
        [--backend hf|openai] [--base-url URL --model NAME | --serve MODEL_FOLDER] [--cache DIR] [--limit N]
        [--out docs/judge_agreement.json]

Each labelled row has `prompt`, `response`, `refused` (the hand label) and `condition`. The keyword classifier
and every judge are compared with the labels over all rows and per condition; a judge's unreadable answers are
counted and left out of its kappa (n says how many rows it covers). Time is measured on the judge's cache misses.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

from cna.evaluation.judges import Judge, JudgeConfig, Verdict, VerdictCache, cohen_kappa, make_judge
from cna.evaluation.keywords import KeywordRefusalClassifier
from cna.judge import transformers_server

ROOT = Path(__file__).resolve().parents[1]


def agreement(labels: list[bool], verdicts: list[bool | None]) -> dict:
    pairs = [(label, verdict) for label, verdict in zip(labels, verdicts, strict=True) if verdict is not None]
    kappa = cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs])
    return {"n": len(pairs), "unreadable": len(labels) - len(pairs),
            "agreement": round(sum(x == y for x, y in pairs) / len(pairs), 3) if pairs else None,
            "kappa": None if kappa is None else round(kappa, 3)}


def main() -> None:
    args = _arguments()
    if args.serve is None:
        return judge_and_report(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its server (finally)
    with transformers_server(args.serve) as url:
        args.backend, args.base_url, args.model = "openai", url, str(args.serve)
        return judge_and_report(args)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, default=ROOT / "tests" / "data" / "qwen_refusal_labels.jsonl")
    parser.add_argument("--judges", nargs="+", default=["yesno", "strongreject"])
    parser.add_argument("--backend", default="hf")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    parser.add_argument("--local-name", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--concurrency", type=int, default=4, help="openai backend: requests in flight")
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N rows (timing runs)")
    parser.add_argument("--cache", type=Path, default=None, help="verdict cache folder (default: none)")
    parser.add_argument("--serve", type=Path, default=None,
                        help="a model folder: judge through `transformers serve` started on 127.0.0.1 for the run")
    parser.add_argument("--cached-only", action="store_true",
                        help="use only verdicts already in --cache (rows without one count as not judged)")
    parser.add_argument("--chunk", type=int, default=16, help="rows per judge call: the cache fills as it goes")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def judge_and_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in args.labels.open()][: args.limit]
    labels = [bool(r["refused"]) for r in rows]
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    keyword = KeywordRefusalClassifier()
    verdicts: dict[str, list[bool | None]] = {"keyword": [keyword(r) for r in responses]}
    report: dict = {"labels": str(args.labels.relative_to(ROOT) if args.labels.is_relative_to(ROOT) else args.labels),
                    "rows": len(rows), "backend": args.backend, "model": args.model, "judges": {}}
    max_tokens = {"yesno": 4, "strongreject": 40, "rating": 12}
    for name in args.judges:
        judge: Judge = make_judge(JudgeConfig(name=name, backend=args.backend, model=args.model,
                                              local_name=args.local_name, base_url=args.base_url,
                                              max_new_tokens=max_tokens[name], batch_size=8,
                                              concurrency=args.concurrency, timeout_s=600, retries=1))
        judge.cache = VerdictCache(args.cache) if args.cache else None
        if args.cached_only:
            judge.backend.complete = _refuse_to_ask  # any cache miss fails loudly instead of loading work
        started = time.perf_counter()
        judged: list[Verdict] = []
        not_judged = 0  # --cached-only rows without a verdict: counted apart from unreadable answers
        for start in range(0, len(rows), args.chunk):
            chunk = slice(start, start + args.chunk)
            if args.cached_only:
                keys = [judge.key(p, r) for p, r in zip(prompts[chunk], responses[chunk], strict=True)]
                found = [judge.cache.get(k) for k in keys]
                not_judged += sum(v is None for v in found)
                judged += [v or Verdict(None, None) for v in found]
            else:
                judged += judge(prompts[chunk], responses[chunk])
        seconds = time.perf_counter() - started
        hits = judge.cache.hits if judge.cache else 0
        verdicts[name] = [v.refused for v in judged]
        report["judges"][name] = {
            "seconds": round(seconds, 1), "judged_now": len(rows) - hits, "questions_asked": judge.questions_asked,
            "retried": judge.retried, "not_judged": not_judged,
            "seconds_per_100": round(100 * seconds / (len(rows) - hits), 1) if len(rows) > hits else None,
            "mean_score": _mean([v.score for v in judged if v.parsed]),
        }
        for row, verdict in zip(rows, judged, strict=True):
            row.setdefault("judged", {})[name] = {"refused": verdict.refused, "score": verdict.score,
                                                  "answer": verdict.answer}
    by_condition: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_condition[row.get("condition", "unsteered")].append(i)
    report["agreement"] = {
        rater: {"all": agreement(labels, flags),
                **{c: agreement([labels[i] for i in idx], [flags[i] for i in idx]) for c, idx in by_condition.items()}}
        for rater, flags in verdicts.items()
    }
    if "helps" in rows[0]:
        helps = [bool(r["helps"]) for r in rows]
        report["helps_harmful_goal"] = sum(helps)
        for name in args.judges:
            scores = [(r["judged"][name]["score"], h) for r, h in zip(rows, helps, strict=True)
                      if r["judged"][name]["score"] is not None]
            report["judges"][name]["mean_score_when_helpful"] = _mean([s for s, h in scores if h])
            report["judges"][name]["mean_score_when_not_helpful"] = _mean([s for s, h in scores if not h])
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (args.out.with_suffix(".verdicts.jsonl")).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _refuse_to_ask(questions, max_new_tokens):
    raise RuntimeError("--cached-only: a question reached the model")


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


if __name__ == "__main__":
    main()
