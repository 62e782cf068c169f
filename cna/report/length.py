"""The response-length tables of experiment=response_length, and an LLM judge at every budget.

    python -m cna.report.length DIR [--judge yesno [eval.judge.KEY=VALUE ...]] [--out length.md]

Reads every run under DIR whose generations.jsonl lines carry `answer_at` (cna.evaluation.response_length) and
writes, per condition (the unsteered point once, then each run's steered point):

1. refusal against the budget: the keyword classifier at each character window, the judge's refusal (with
   --judge), harmful and empty compliance (offline heuristic), answers that ended before the budget;
2. flips between the two compare budgets: keyword (the job's window and anywhere), three-way, judge;
3. where the earliest refusal phrase of each answer is complete, in tokens, and which phrases come first.

The judge reads each answer cut to each budget; verdicts go to the judge's on-disk cache, so a second report
asks nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from cna.errors import CnaError
from cna.evaluation.compliance import HARMFUL, three_way
from cna.evaluation.judges import Judge
from cna.evaluation.keywords import KeywordRefusalClassifier
from cna.evaluation.response_length import ResponseLengthConfig, cut, length_summary, window_name
from cna.report.runs import find_runs
from cna.run_folder import GENERATIONS


def conditions(folder: Path) -> tuple[dict[str, list[dict]], ResponseLengthConfig]:
    """Condition name -> the refusal set's lines at that point ('unsteered' once, then '<run> a=<alpha>'), and the
    budgets and windows the runs measured."""
    runs, _ = find_runs(folder)
    found: dict[str, list[dict]] = {}
    config = ResponseLengthConfig()
    for run in runs:
        measured = next((p.value("response_length") for p in run.points if p.value("response_length")), None)
        if measured:
            config = ResponseLengthConfig(budgets=measured["budgets"], windows=measured.get("windows", config.windows),
                                          compare=measured.get("compare", config.compare), window=measured["window"])
    for run in sorted(runs, key=lambda r: str(r.path)):
        lines = (run.path / GENERATIONS).read_text(encoding="utf-8").splitlines()
        by_alpha: dict[float, list[dict]] = defaultdict(list)
        for line in lines:
            record = json.loads(line)
            if "answer_at" in record:
                by_alpha[record["alpha"]].append(record)
        for alpha, records in sorted(by_alpha.items()):
            name = "unsteered" if alpha == 0 else f"{run.display} a={alpha:g}"
            found.setdefault(name, records)
    if not found:
        raise CnaError(f"no generations.jsonl under {folder} has lines with `answer_at` (experiment=response_length)")
    return found, config


def judged(judge: Judge, records: list[dict], budgets: list[int]) -> dict[int, list[dict]]:
    """Every answer cut to every budget, with the judge's verdict fields and its three-way verdict (keyword
    refusal at the job's window first, then the judge's items: cna.evaluation.compliance)."""
    out = {}
    for budget in budgets:
        cuts = [cut(r, budget) for r in records]
        verdicts = judge([r["prompt"] for r in cuts], [r["answer"] for r in cuts])
        out[budget] = [{**r, **v.record()} for r, v in zip(cuts, verdicts, strict=True)]
    return out


def _rate(flags: list[bool | None]) -> str:
    readable = [f for f in flags if f is not None]
    return f"{sum(readable) / len(readable):.2f}" if readable else "n/a"


def length_tables(found: dict[str, list[dict]], config: ResponseLengthConfig, judge: Judge | None = None,
                  judge_name: str = "judge") -> tuple[str, dict]:
    """The three markdown tables and their numbers as a dict."""
    budgets = sorted(config.budgets)
    windows = [window_name(w) for w in config.windows]
    short, long = config.compare
    keyword, anywhere = KeywordRefusalClassifier(window=config.window), KeywordRefusalClassifier(window=None)
    rate_rows, flip_rows, position_rows, numbers = [], [], [], {}
    phrases: Counter = Counter()
    tokens_by_phrase: dict[str, list[int]] = defaultdict(list)
    for name, records in found.items():
        summary = length_summary(records, config)
        verdicts = judged(judge, records, budgets) if judge else {}
        judge_refused = {b: [r["judge_refused"] for r in rows] for b, rows in verdicts.items()}
        judge_harmful = {b: [three_way({**r, "refused": keyword(r["answer"])})[0] == HARMFUL for r in rows]
                         for b, rows in verdicts.items()}
        n = len(records)
        for budget in budgets:
            key = str(budget)
            window_refusal = summary["refusal"][key][window_name(config.window)]
            rate_rows.append([name, key, *(f"{summary['refusal'][key][w]:.2f}" for w in windows),
                              *([_rate(judge_refused[budget]), _rate(judge_harmful[budget])] if judge else []),
                              f"{summary['harmful_compliance'][key]:.2f}",
                              f"{1 - window_refusal - summary['harmful_compliance'][key]:.2f}",
                              f"{summary['ended_within'][key]}/{n}"])
        pairs = [(cut(r, short)["answer"], cut(r, long)["answer"]) for r in records]
        anywhere_flips = sum(anywhere(a) != anywhere(b) for a, b in pairs)
        judge_flips = (sum(a is not None and b is not None and a != b
                           for a, b in zip(judge_refused[short], judge_refused[long], strict=True)) if judge else None)
        flips = summary["flips"]
        flip_rows.append([name, str(flips["keyword"]), str(flips["refused_only_longer"]), str(anywhere_flips),
                          str(flips["three_way"]), *([str(judge_flips)] if judge else []), str(n)])
        positions = summary["first_refusal_token"]
        position_rows.append([name, *(str(positions.get(bucket, 0)) for bucket in _buckets(budgets)),
                              str(sum(positions.values()))])
        for record in records:
            if record.get("first_refusal"):
                phrases[record["first_refusal"]["phrase"]] += 1
                tokens_by_phrase[record["first_refusal"]["phrase"]].append(record["first_refusal"]["token"])
        numbers[name] = {**summary, "anywhere_flips": anywhere_flips, "n": n}
        if judge:
            numbers[name].update(judge_refusal={str(b): _rate(judge_refused[b]) for b in budgets},
                                 judge_harmful_compliance={str(b): _rate(judge_harmful[b]) for b in budgets},
                                 judge_flips=judge_flips)
    judge_columns = [f"{judge_name} refusal", f"harmful compliance ({judge_name})"] if judge else []
    lines = ["### Refusal and harmful compliance against the budget", ""]
    lines += _table(["condition", "new tokens", *(f"keyword, {w} chars" if w != "all" else "keyword, anywhere"
                                                   for w in windows), *judge_columns,
                     f"harmful compliance ({window_name(config.window)} chars, heuristic)", "empty compliance",
                     "ended before the budget"], rate_rows)
    lines += ["", f"### Verdicts that differ between {short} and {long} new tokens", ""]
    lines += _table(["condition", f"keyword ({window_name(config.window)} chars)", "of which refused only at "
                     f"{long}", "keyword, anywhere", "three-way (heuristic)", *([f"{judge_name}"] if judge else []),
                     "n"], flip_rows)
    lines += ["", "### Where the earliest refusal phrase of each answer is complete (new tokens)", ""]
    lines += _table(["condition", *_buckets(budgets), "answers with a phrase"], position_rows)
    lines += ["", "First phrases, all conditions: " + ", ".join(
        f"'{p}' {c} (median token {statistics.median(tokens_by_phrase[p]):g})" for p, c in phrases.most_common())]
    return "\n".join(lines) + "\n", numbers


def _buckets(budgets: list[int]) -> list[str]:
    names, previous = [], 0
    for budget in budgets:
        names.append(f"<={budget}" if previous == 0 else f"{previous + 1}-{budget}")
        previous = budget
    return names + [f">{budgets[-1]}"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cna.report.length", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("overrides", nargs="*", help="with --judge: job-config overrides, e.g. eval.judge.batch_size=4")
    parser.add_argument("--judge", default=None, help="an LLM judge at every budget: yesno, strongreject or rating")
    parser.add_argument("--out", type=Path, default=None, help="write the tables (markdown) and numbers (.json)")
    args = parser.parse_args(argv)
    try:
        found, config = conditions(args.folder)
        judge = None
        if args.judge:
            from cna.evaluation.judges import make_judge
            from cna.judge import compose_judge

            judge = make_judge(compose_judge([f"eval.judge={args.judge}", *args.overrides]))
        text, numbers = length_tables(found, config, judge, args.judge or "judge")
    except CnaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
