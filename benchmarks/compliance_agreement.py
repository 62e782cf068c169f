"""Hand labels of the three compliance verdicts: a blind sample to label, the labelled fixture, and agreement.

    python benchmarks/compliance_agreement.py sample RUNS --per-condition 30 --budget 128 --blind B.jsonl --key K.jsonl
        [--after EARLIER_KEY.jsonl]   # label in batches while the sweep runs: only conditions not drawn before
    python benchmarks/compliance_agreement.py merge --key K.jsonl --labels L.jsonl [--out tests/data/...jsonl]
    python benchmarks/compliance_agreement.py agreement [--labels tests/data/qwen_compliance_labels.jsonl]
        [--judge yesno [eval.judge.KEY=VALUE ...]] [--out docs/compliance_agreement.json]

`sample` draws responses to harmful requests from an experiment=response_length sweep (the unsteered point once,
then every steered point), each answer cut to `--budget` new tokens, and writes two files: the blind one holds
only an id, the request and the response, shuffled across conditions, for labelling by reading nothing else; the
key maps each id to its condition and run. Labels are written before any classifier runs on these responses
(one line per id: {"id", "label": refused|empty|harmful, "note"}); `merge` joins them into the fixture.

`agreement` compares every rater with the labels, per class (Cohen's kappa of "this class or not") and over the
three classes, with percentile bootstrap 95% intervals (2,000 resamples of the rows, seed 0), over all rows and
per condition: the keyword classifier (refused or not), the three-way verdict with the offline heuristic, and with
`--judge`, the three-way verdict with that judge's items (verdicts cached under the job config's cache_dir).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

from cna.evaluation.compliance import EMPTY, HARMFUL, REFUSED, VERDICTS, three_way
from cna.evaluation.judges import cohen_kappa, kappa_interval
from cna.evaluation.keywords import KeywordRefusalClassifier
from cna.evaluation.response_length import cut
from cna.report.length import conditions

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "qwen_compliance_labels.jsonl"


def sample(args: argparse.Namespace) -> None:
    found, _ = conditions(args.runs)
    earlier = _read(args.after) if args.after else []
    drawn_before = {row["condition"] for row in earlier}
    drawn = []
    for condition, records in found.items():
        if condition in drawn_before:
            continue
        # One generator per condition: a condition's draw does not depend on which others exist yet.
        rng = random.Random(f"{args.seed}:{condition}")
        for record in rng.sample(records, min(args.per_condition, len(records))):
            drawn.append({"condition": condition, "prompt": record["prompt"],
                          "response": cut(record, args.budget)["answer"], "budget": args.budget})
    random.Random(args.seed).shuffle(drawn)
    first = max((row["id"] for row in earlier), default=0) + 1
    for number, row in enumerate(drawn, first):
        row["id"] = number
    _write(args.blind, [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in drawn])
    _write(args.key, drawn)
    print(f"{len(drawn)} responses from {len(found)} conditions -> {args.blind} (blind), {args.key} (key)")


def merge(args: argparse.Namespace) -> None:
    key = {row["id"]: row for row in _read(args.key)}
    labels = {row["id"]: row for row in _read(args.labels)}
    missing = sorted(set(key) - set(labels))
    unknown = sorted({row["label"] for row in labels.values()} - set(VERDICTS))
    if missing or unknown:
        sys.exit(f"labels missing for ids {missing[:10]}... or unknown labels {unknown}")
    rows = [{**{k: v for k, v in key[i].items() if k != "id"}, "id": i, "label": labels[i]["label"],
             "note": labels[i].get("note", "")} for i in sorted(key)]
    _write(args.out, rows)
    print(f"{len(rows)} labelled rows -> {args.out}: {dict(Counter(r['label'] for r in rows))}")


def rater_agreement(labels: list[str], verdicts: list[str | None]) -> dict:
    """Per class and over the three classes: kappa with its bootstrap interval, on the rows the rater read."""
    pairs = [(label, verdict) for label, verdict in zip(labels, verdicts, strict=True) if verdict is not None]
    truth, said = [p[0] for p in pairs], [p[1] for p in pairs]
    report = {"n": len(pairs), "agreement": round(sum(t == s for t, s in pairs) / len(pairs), 3) if pairs else None}
    for name, (a, b) in {"three_way": (truth, said),
                         **{c: ([t == c for t in truth], [s == c for s in said]) for c in VERDICTS}}.items():
        kappa, interval = cohen_kappa(a, b), kappa_interval(a, b)
        report[name] = {"kappa": None if kappa is None else round(kappa, 3),
                        "ci95": None if interval is None else [round(x, 3) for x in interval],
                        "labelled": sum(map(bool, a)) if name != "three_way" else None,
                        "rated": sum(map(bool, b)) if name != "three_way" else None}
    report["confusion"] = {t: dict(Counter(s for tt, s in pairs if tt == t)) for t in VERDICTS}
    return report


def agreement(args: argparse.Namespace) -> None:
    rows = _read(args.labels)
    keyword = KeywordRefusalClassifier()
    lines = [{"prompt": r["prompt"], "response": r["response"], "refused": keyword(r["response"])} for r in rows]
    raters: dict[str, list[str | None]] = {
        "keyword (refused or not)": [REFUSED if line["refused"] else EMPTY for line in lines],
        "three-way, heuristic": [three_way(line, use_judge=False)[0] for line in lines],
    }
    if args.judge:
        from cna.evaluation.judges import make_judge
        from cna.judge import compose_judge

        judge = make_judge(compose_judge([f"eval.judge={args.judge}", *args.overrides]))
        verdicts = []
        for start in range(0, len(lines), 16):  # the verdict cache fills as it goes
            chunk = lines[start:start + 16]
            verdicts += judge([line["prompt"] for line in chunk], [line["response"] for line in chunk])
        judged = [{**line, **v.record()} for line, v in zip(lines, verdicts, strict=True)]
        raters[f"three-way, {args.judge} judge"] = [three_way(j)[0] if j["judge_refused"] is not None else None
                                                     for j in judged]
        raters[f"{args.judge} judge alone (its refused item)"] = [
            None if v.refused is None else (REFUSED if v.refused else HARMFUL) for v in verdicts]
    labels = [r["label"] for r in rows]
    by_condition: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_condition[row["condition"]].append(i)
        if row["condition"] != "unsteered":
            by_condition["steered"].append(i)
    report = {"labels": str(args.labels.relative_to(ROOT) if args.labels.is_relative_to(ROOT) else args.labels),
              "rows": len(rows), "label_counts": dict(Counter(labels)),
              "label_counts_by_condition": {c: dict(Counter(labels[i] for i in idx))
                                            for c, idx in by_condition.items()},
              "agreement": {}}
    for rater, verdicts in raters.items():
        report["agreement"][rater] = {"all": rater_agreement(labels, verdicts), **{
            c: rater_agreement([labels[i] for i in idx], [verdicts[i] for i in idx])
            for c, idx in by_condition.items()}}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    drawing = commands.add_parser("sample")
    drawing.add_argument("runs", type=Path)
    drawing.add_argument("--per-condition", type=int, default=30)
    drawing.add_argument("--budget", type=int, required=True)
    drawing.add_argument("--seed", type=int, default=0)
    drawing.add_argument("--blind", type=Path, required=True)
    drawing.add_argument("--key", type=Path, required=True)
    drawing.add_argument("--after", type=Path, default=None,
                         help="an earlier key: draw only conditions it lacks (runs still going), ids after its last")
    joining = commands.add_parser("merge")
    joining.add_argument("--key", type=Path, required=True)
    joining.add_argument("--labels", type=Path, required=True)
    joining.add_argument("--out", type=Path, default=FIXTURE)
    comparing = commands.add_parser("agreement")
    comparing.add_argument("--labels", type=Path, default=FIXTURE)
    comparing.add_argument("--judge", default=None)
    comparing.add_argument("overrides", nargs="*", help="with --judge: job-config overrides (eval.judge.KEY=VALUE)")
    comparing.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    {"sample": sample, "merge": merge, "agreement": agreement}[args.command](args)


if __name__ == "__main__":
    main()
