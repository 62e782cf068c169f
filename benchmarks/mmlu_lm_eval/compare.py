"""Cross-check cna's MMLU scorer against EleutherAI's lm-evaluation-harness on the same questions and prompt.

    # the lm_eval metric (one process, project venv with `pip install 'cna[lm_eval]'`): both scorers on one model
    .venv/bin/python benchmarks/mmlu_lm_eval/compare.py metric --n 200

    # or lm-eval's own command line, which loads the model itself (see README.md):
    .venv/bin/python benchmarks/mmlu_lm_eval/compare.py ours --out /tmp/mmlu_lm_eval
    lm_eval --model hf ... --include_path /tmp/mmlu_lm_eval/task --tasks cna_mmlu_local --log_samples ...
    python3 benchmarks/mmlu_lm_eval/compare.py compare --ours /tmp/mmlu_lm_eval --lm-eval-out /tmp/lmeval_out

Both routes sample the questions with `stratified_sample(load_mmlu_folder(...), n, seed)`, score them with
`evaluate_mmlu` (zero-shot, the arg-max of log p(" A".." D") after "Answer:"), and run lm-eval on a local task
written by `cna.evaluation.lm_eval.write_mmlu_task` (the same prompt as a Jinja template, choices " A".." D").
Pass: accuracies within 1 point and per-question agreement of the arg-max letter >= 97%.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

LETTERS = "ABCD"
TASK = "cna_mmlu_local"


def agreement(rows: list[dict], theirs: list[list[float]]) -> dict:
    """Both accuracies and the per-question agreement, from our rows ({answer, our_pred, our_logprobs}) and
    lm-eval's log-likelihoods of " A".." D" per question, in the same order."""
    agree = our_correct = their_correct = 0
    max_gap = 0.0
    disagreements = []
    for doc_id, (row, lls) in enumerate(zip(rows, theirs, strict=True)):
        their_pred = max(range(4), key=lls.__getitem__)
        agree += their_pred == row["our_pred"]
        our_correct += row["our_pred"] == row["answer"]
        their_correct += their_pred == row["answer"]
        max_gap = max(max_gap, *(abs(a - b) for a, b in zip(lls, row["our_logprobs"], strict=True)))
        if their_pred != row["our_pred"]:
            disagreements.append({"doc_id": doc_id, "subject": row["subject"], "answer": LETTERS[row["answer"]],
                                  "ours": LETTERS[row["our_pred"]], "lm_eval": LETTERS[their_pred],
                                  "our_logprobs": [round(x, 4) for x in row["our_logprobs"]],
                                  "lm_eval_logprobs": [round(x, 4) for x in lls]})
    n = len(rows)
    return {"n": n, "ours_acc": our_correct / n, "lm_eval_acc": their_correct / n,
            "diff_points": round(100 * (their_correct - our_correct) / n, 2), "agreement": f"{agree}/{n}",
            "agreement_rate": agree / n, "max_abs_logprob_gap": max_gap if math.isfinite(max_gap) else None,
            "disagreements": disagreements}


def verdict(report: dict) -> str:
    ok = abs(report["diff_points"]) <= 1.0 and report["agreement_rate"] >= 0.97
    return f"{'PASS' if ok else 'FAIL'} (within 1 point, >= 97% per-question agreement)"


def score_ours(lm_model, tokenizer, questions, batch_size: int) -> tuple[list[dict], float]:
    """Our predictions and letter log-probabilities per question, and the seconds `evaluate_mmlu` took."""
    from cna.evaluation.mmlu import evaluate_mmlu, letter_token_ids, mmlu_prompt
    from cna.evaluation.scoring import next_token_logprobs

    started = time.perf_counter()
    result = evaluate_mmlu(lm_model, tokenizer, questions, k_shot=0, batch_size=batch_size)
    seconds = time.perf_counter() - started
    # The same scoring primitive again, for the letter log-probabilities (a diagnostic, not timed).
    prompts = [mmlu_prompt(q) for q in questions]
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in prompts]
    logprobs = next_token_logprobs(lm_model, encoded, pad_token_id=tokenizer.pad_token_id,
                                   token_ids=letter_token_ids(tokenizer), batch_size=batch_size, progress=False)
    rows = [{"subject": q.subject, "question": q.question, "choices": list(q.choices), "answer": q.answer,
             "our_pred": pred, "our_logprobs": lp, "our_prompt": prompt}
            for q, pred, lp, prompt in zip(questions, result.predictions, logprobs.tolist(), prompts, strict=True)]
    return rows, seconds


def _sample(args: argparse.Namespace):
    from cna.evaluation.mmlu import load_mmlu_folder, stratified_sample

    return stratified_sample(load_mmlu_folder(args.mmlu, "test"), args.n, seed=args.seed)


def run_metric(args: argparse.Namespace) -> None:
    """Both scorers on one loaded model: evaluate_mmlu, then the lm_eval metric (HFLM around the same object)."""
    import cna
    from cna.evaluation.lm_eval import LmEval, write_mmlu_task

    started = time.perf_counter()
    questions = _sample(args)
    model, tokenizer = cna.load_model(args.model)
    load_s = time.perf_counter() - started
    rows, ours_s = score_ours(model, tokenizer, questions, args.batch_size)

    out = Path(args.out)
    metric_started = time.perf_counter()
    metric = LmEval([TASK], include_path=str(write_mmlu_task(questions, out / "task")), batch_size=args.batch_size)
    prepared = time.perf_counter()
    results = cna.evaluate(model, tokenizer, [metric], alphas=[0.0], progress=False)
    finished = time.perf_counter()
    theirs = [[float(resp[0]) for resp in sample["filtered_resps"]]
              for sample in sorted(metric.per_question[0.0][TASK], key=lambda s: s["doc_id"])]
    task = metric.task_dict["tasks"][TASK]
    same_prompt = sum(task.doc_to_text(doc) == row["our_prompt"] for doc, row in zip(task.eval_docs, rows, strict=True))
    report = {**agreement(rows, theirs), "identical_prompt": f"{same_prompt}/{len(rows)}",
              "lm_eval_field": results.points[0].value(f"lm_eval/{TASK}/acc"),
              "lm_eval_ci95": results.points[0].value(f"lm_eval/{TASK}/acc_ci95"),
              "model": args.model, "load_s": round(load_s, 1), "ours_s": round(ours_s, 1),
              "lm_eval_prepare_s": round(prepared - metric_started, 1),
              "lm_eval_s": round(finished - prepared, 1), "lm_eval_version": metric.results()["lm_eval"]["version"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(verdict(report))


def run_ours(args: argparse.Namespace) -> None:
    """Our scores to a file, and the lm-eval task folder, for lm-eval's own command line."""
    import cna
    from cna.evaluation.lm_eval import write_mmlu_task

    questions = _sample(args)
    model, tokenizer = cna.load_model(args.model)
    rows, seconds = score_ours(model, tokenizer, questions, args.batch_size)
    out = Path(args.out)
    write_mmlu_task(questions, out / "task")
    with (out / "questions.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(json.dumps({"n": len(rows), "accuracy": sum(r["our_pred"] == r["answer"] for r in rows) / len(rows),
                      "score_s": round(seconds, 1), "task": str(out / "task")}))


def _requests(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each logged request; `arguments` is a dict in lm-eval 0.4.9+, a list before."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        return [(arg["arg_0"], arg["arg_1"]) for arg in arguments.values()]
    return [(arg[0], arg[1]) for arg in arguments]


def run_compare(args: argparse.Namespace) -> None:
    """`ours` against lm-eval's --log_samples output (stdlib only)."""
    rows = [json.loads(line) for line in (Path(args.ours) / "questions.jsonl").read_text().splitlines()]
    found = sorted(Path(args.lm_eval_out).rglob(f"samples_{TASK}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no samples_{TASK}_*.jsonl under {args.lm_eval_out} (was lm_eval run with --log_samples?)")
    samples = {s["doc_id"]: s for s in map(json.loads, found[-1].read_text().splitlines())}
    if sorted(samples) != list(range(len(rows))):
        raise SystemExit(f"{found[-1]} has {len(samples)} docs, ours has {len(rows)}")
    same_prompt = sum(_requests(samples[i]) == [(row["our_prompt"], f" {letter}") for letter in LETTERS]
                      for i, row in enumerate(rows))
    theirs = [[float(resp[0]) for resp in samples[i]["filtered_resps"]] for i in range(len(rows))]
    report = {**agreement(rows, theirs), "identical_prompt_and_continuations": f"{same_prompt}/{len(rows)}",
              "samples_file": str(found[-1])}
    print(json.dumps(report, indent=2))
    print(verdict(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data_dir = os.environ.get("CNA_DATA_DIR", "../shared/data")
    model_cache = os.environ.get("CNA_MODEL_CACHE", str(Path.home() / ".cache" / "cna-models"))
    for name, func, help_text in (("metric", run_metric, "both scorers in one process: the lm_eval metric"),
                                  ("ours", run_ours, "our scores and the task folder, for lm-eval's command line")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--mmlu", default=str(Path(data_dir) / "mmlu"))
        command.add_argument("--model", default=str(Path(model_cache) / "qwen2.5-coder-0.5b-instruct"))
        command.add_argument("--n", type=int, default=200)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--out", default="/tmp/mmlu_lm_eval")
        command.set_defaults(func=func)
    compare = sub.add_parser("compare", help="`ours` against lm-eval's logged samples (stdlib only)")
    compare.add_argument("--ours", default="/tmp/mmlu_lm_eval")
    compare.add_argument("--lm-eval-out", default="/tmp/lmeval_out")
    compare.set_defaults(func=run_compare)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
