"""Cross-check cna's MMLU scorer against EleutherAI's lm-evaluation-harness on the same questions.

    # 1. our scorer (project venv): sample the questions, score them, write them with our predictions
    .venv/bin/python benchmarks/mmlu_lm_eval/compare.py ours --out /tmp/mmlu_lm_eval/questions.jsonl
    # 2. lm-eval (its own venv) over that file: see README.md
    # 3. compare (any python 3, stdlib only)
    python3 benchmarks/mmlu_lm_eval/compare.py compare --ours /tmp/mmlu_lm_eval/questions.jsonl \
        --lm-eval-out /tmp/lmeval_out

The JSONL rows carry subject, question, choices, answer (the fields the task YAML reads) plus our
predicted letter index and our log-probabilities of " A".." D", so the comparison needs no model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

LETTERS = "ABCD"


def run_ours(args: argparse.Namespace) -> None:
    from cna.evaluation.mmlu import evaluate_mmlu, letter_token_ids, load_mmlu_folder, mmlu_prompt, stratified_sample
    from cna.evaluation.scoring import next_token_logprobs
    from cna.models import ModelSpec, load_model

    started = time.perf_counter()
    questions = stratified_sample(load_mmlu_folder(args.mmlu, "test"), args.n, seed=args.seed)
    lm = load_model(ModelSpec(name="qwen", path=args.model))
    loaded = time.perf_counter()
    result = evaluate_mmlu(lm.model, lm.tokenizer, questions, k_shot=0, batch_size=args.batch_size)
    scored = time.perf_counter()
    # The same scoring primitive again, for the letter log-probabilities (a diagnostic, not timed).
    prompts = [mmlu_prompt(q) for q in questions]
    encoded = [lm.tokenizer(text, add_special_tokens=True)["input_ids"] for text in prompts]
    logprobs = next_token_logprobs(lm.model, encoded, pad_token_id=lm.tokenizer.pad_token_id,
                                   token_ids=letter_token_ids(lm.tokenizer), batch_size=args.batch_size,
                                   progress=False)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        rows = zip(questions, result.predictions, logprobs.tolist(), prompts, encoded, strict=True)
        for q, pred, lp, prompt, ids in rows:
            handle.write(json.dumps({"subject": q.subject, "question": q.question, "choices": list(q.choices),
                                     "answer": q.answer, "our_pred": pred, "our_logprobs": lp,
                                     "our_prompt": prompt, "our_prompt_tokens": len(ids)}) + "\n")
    summary = {"n": result.n, "accuracy": result.accuracy, "ci95": result.ci95,
               "load_s": round(loaded - started, 1), "score_s": round(scored - loaded, 1),
               "bos_added": encoded[0][0] == lm.tokenizer.bos_token_id}
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


def _samples_file(folder: Path, task: str) -> Path:
    found = sorted(folder.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no samples_{task}_*.jsonl under {folder} (was lm_eval run with --log_samples?)")
    return found[-1]


def _requests(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each logged request; `arguments` is a dict in lm-eval 0.4.9+, a list before."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        return [(arg["arg_0"], arg["arg_1"]) for arg in arguments.values()]
    return [(arg[0], arg[1]) for arg in arguments]


def run_compare(args: argparse.Namespace) -> None:
    ours = [json.loads(line) for line in Path(args.ours).read_text(encoding="utf-8").splitlines()]
    samples_path = _samples_file(Path(args.lm_eval_out), args.task)
    samples = {}
    for line in samples_path.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        samples[sample["doc_id"]] = sample
    if sorted(samples) != list(range(len(ours))):
        raise SystemExit(f"{samples_path} has {len(samples)} docs, ours has {len(ours)}")

    agree = our_correct = their_correct = same_prompt = 0
    max_gap = 0.0
    disagreements = []
    for doc_id, row in enumerate(ours):
        sample = samples[doc_id]
        if sample["doc"]["question"] != row["question"] or int(sample["target"]) != row["answer"]:
            raise SystemExit(f"doc {doc_id} differs between the two runs")
        same_prompt += _requests(sample) == [(row["our_prompt"], f" {letter}") for letter in LETTERS]
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]  # [log-likelihood, is_greedy] per choice
        their_pred = max(range(4), key=theirs.__getitem__)
        agree += their_pred == row["our_pred"]
        our_correct += row["our_pred"] == row["answer"]
        their_correct += float(sample["acc"]) == 1.0
        max_gap = max(max_gap, *(abs(a - b) for a, b in zip(theirs, row["our_logprobs"], strict=True)))
        if their_pred != row["our_pred"]:
            disagreements.append({"doc_id": doc_id, "subject": row["subject"], "answer": LETTERS[row["answer"]],
                                  "ours": LETTERS[row["our_pred"]], "lm_eval": LETTERS[their_pred],
                                  "our_logprobs": [round(x, 4) for x in row["our_logprobs"]],
                                  "lm_eval_logprobs": [round(x, 4) for x in theirs]})
    n = len(ours)
    report = {
        "n": n,
        "ours_acc": our_correct / n,
        "lm_eval_acc": their_correct / n,
        "diff_points": round(100 * (their_correct - our_correct) / n, 2),
        "agreement": f"{agree}/{n}",
        "identical_prompt_and_continuations": f"{same_prompt}/{n}",
        "max_abs_logprob_gap": max_gap if math.isfinite(max_gap) else None,
        "disagreements": disagreements,
        "samples_file": str(samples_path),
    }
    print(json.dumps(report, indent=2))
    ok = abs(report["diff_points"]) <= 1.0 and agree / n >= 0.97
    print("PASS" if ok else "FAIL", "(within 1 point, >= 97% per-question agreement)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ours = sub.add_parser("ours", help="sample and score with cna (project venv)")
    data_dir = os.environ.get("CNA_DATA_DIR", "../shared/data")
    model_cache = os.environ.get("CNA_MODEL_CACHE", str(Path.home() / ".cache" / "cna-models"))
    ours.add_argument("--mmlu", default=str(Path(data_dir) / "mmlu"))
    ours.add_argument("--model", default=str(Path(model_cache) / "qwen2.5-coder-0.5b-instruct"))
    ours.add_argument("--n", type=int, default=200)
    ours.add_argument("--seed", type=int, default=0)
    ours.add_argument("--batch-size", type=int, default=8)
    ours.add_argument("--out", default="/tmp/mmlu_lm_eval/questions.jsonl")
    ours.set_defaults(func=run_ours)
    compare = sub.add_parser("compare", help="compare with lm-eval's logged samples (stdlib only)")
    compare.add_argument("--ours", default="/tmp/mmlu_lm_eval/questions.jsonl")
    compare.add_argument("--lm-eval-out", default="/tmp/lmeval_out")
    compare.add_argument("--task", default="cna_mmlu_local")
    compare.set_defaults(func=run_compare)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
