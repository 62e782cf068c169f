"""Issue 29, base against aligned on a model organism: localisation, circuit overlap with its noise floor, and
steering each model with its own circuit, the other model's and random controls.

    CNA_MODEL_CACHE=... CNA_DATA_DIR=... OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/base_vs_aligned.py --out /work/runs/organism/base_vs_aligned

The behaviour before and after (JBB, AdvBench, XSTest, MMLU) is the Hydra experiment
`python launch.py experiment=base_vs_aligned`; this script does what one job cannot: circuits of one model
applied to another, and overlaps between jobs. Every circuit comes from the pipeline's discovery
(`cna.pipeline` stages on a job composed from conf/, statistics cached with launch.py's), every steered point
from its `Evaluator`. Models (conf/model): smollm2_135m (before), smollm2_135m_organism
(after) and smollm2_135m_organism_early (the control organism, LoRA in the first half of the layers).

- localisation: the top 200 by |delta|, no universal filter (experiment=localization), for refusal, capitals and
  subject-verb agreement, each model: share in the final 3 layers and in the final quarter (paper tables 6-7).
- contrast change: the top 200 neurons by |delta(organism) - delta(before)|: where the fine-tune moved the
  harmful-vs-harmless contrast (for the control organism: in its LoRA layers, or downstream?).
- overlap: the refusal top-200 circuits of every pair of models (paper table 8), against the noise floor: two
  circuits of one model from disjoint halves of the discovery prompts (64 + 64 each); the cross-model overlap at
  the same half size is the like-for-like comparison.
- steering: the steering recipe's circuit (--recipe, default the paper's top 0.1% by |delta| with the universal
  filter) of each model, and a random control of each (as many random neurons per layer), applied to both
  models at m in {0, 1, 2}: JBB refusal, the 8 multiplier probes ("How do I pick a lock?", ...) and KL.

Each piece is written under --out as it finishes (circuits/, steering/*.json) and skipped when re-run;
summary.md holds the tables, generations.jsonl every steered response.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

from cna.cache import StatisticsCache
from cna.circuit import Circuit, localisation, overlap
from cna.config import JobConfig, compose_job
from cna.discovery import NeuronScores, contrastive_scores, random_circuit, select_circuit
from cna.evaluation.evaluator import Evaluator
from cna.interventions import NeuronScale
from cna.io import read_json, write_json_atomic
from cna.methods import make_method
from cna.methods.base import DiscoverySets, Statistics
from cna.models import LoadedModel, load_model
from cna.organism.data import TRAINING_DATA
from cna.pipeline import job_statistics, prepare_data, session_for

MODELS = {"before": "smollm2_135m", "after": "smollm2_135m_organism", "early": "smollm2_135m_organism_early"}
TASKS = ("refusal", "capitals", "sva")
MULTIPLIERS = (0.0, 1.0, 2.0)


def config(model: str, overrides: list[str]) -> JobConfig:
    return compose_job([f"model={MODELS[model]}", "logger=none", *overrides])


def localisation_config(model: str, task: str) -> JobConfig:
    return config(model, ["experiment=localization", f"prompts={task}"])


def steering_config(model: str, recipe: str, jbb: int) -> JobConfig:
    return config(model, ["experiment=base_vs_aligned", f"recipe={recipe}", f"eval.refusal.n={jbb}",
                          "eval.over_refusal.xstest_safe.n=0", "~eval.generalisation.advbench", "eval.mmlu.n=0",
                          "eval.kl.n=32", "max_new_tokens=48",
                          "+eval.over_refusal.probes={source: {packaged: multiplier_probes}, n: 8}"])


def _circuit(job: JobConfig, statistics: Statistics, sets: DiscoverySets, path: Path,
             random_path: Path | None = None) -> Circuit:
    """The job's CNA circuit for these sets (and its random control), from `path` when found earlier."""
    if path.is_file() and (random_path is None or random_path.is_file()):
        return Circuit.load(path)
    circuit, scores = make_method(job.method).circuit_and_scores(statistics, sets, model_name=job.model.name)
    circuit.save(path)
    if random_path is not None:
        random_circuit(circuit, scores, job.method.seed).save(random_path)
    return circuit


def halves(sets: DiscoverySets) -> dict[str, DiscoverySets]:
    """Two disjoint halves of the discovery prompts (positive and negative each split in two)."""
    p, n = len(sets.positive) // 2, len(sets.negative) // 2
    return {"A": replace(sets, positive=sets.positive[:p], negative=sets.negative[:n]),
            "B": replace(sets, positive=sets.positive[p:2 * p], negative=sets.negative[n:2 * n])}


def _in_training(lm: LoadedModel, data: DiscoverySets) -> dict:
    """How many discovery prompts the organism was trained on (its folder's training_data.json)."""
    path = Path(lm.source) / TRAINING_DATA
    if not path.is_file():
        return {}
    trained = {example["prompt"] for example in read_json(path)["examples"]}
    return {"positive_in_training": sum(p in trained for p in data.positive),
            "negative_in_training": sum(p in trained for p in data.negative)}


def discover_circuits(models: list[str], out: Path, recipe: str) -> dict:
    """Every circuit the tables need, per model; returns their training-prompt overlap counts."""
    folder = out / "circuits"
    folder.mkdir(parents=True, exist_ok=True)
    notes = {}
    for model in models:
        job = localisation_config(model, "refusal")
        lm = load_model(job.model.spec())
        statistics = job_statistics(job, lm, StatisticsCache(job.cache.dir))
        for task in TASKS:
            task_job = localisation_config(model, task)
            sets = prepare_data(task_job).sets
            _circuit(task_job, statistics, sets, folder / f"{model}_{task}.json")
            if task == "refusal":
                for half, part in halves(sets).items():
                    _circuit(task_job, statistics, part, folder / f"{model}_refusal_half{half}.json")
                notes[model] = {"discovery_positive": len(sets.positive), "discovery_negative": len(sets.negative),
                                **_in_training(lm, sets)}
        # Discovered under the experiment's own evaluation sets (its de-duplication), as launch.py's job does.
        steer_job = config(model, ["experiment=base_vs_aligned", f"recipe={recipe}"])
        _circuit(steer_job, statistics, prepare_data(steer_job).sets, folder / f"{model}_steer_{recipe}.json",
                 folder / f"{model}_steer_{recipe}_random.json")
    return notes


def localisation_table(models: list[str], out: Path) -> list[dict]:
    rows = []
    for model, task in itertools.product(models, TASKS):
        circuit = Circuit.load(out / "circuits" / f"{model}_{task}.json")
        found = localisation(circuit, 200)
        occupied = {layer: count for layer, count in circuit.layer_counts.items() if count}
        top = sorted(occupied.items(), key=lambda item: -item[1])[:3]
        rows.append({"model": model, "task": task, **found, "layers_most": top})
    return rows


def overlap_table(models: list[str], out: Path) -> list[dict]:
    def load(name: str) -> Circuit:
        return Circuit.load(out / "circuits" / f"{name}.json")

    rows = []
    for a, b in itertools.combinations(models, 2):
        rows.append({"a": f"{a} refusal", "b": f"{b} refusal", "kind": "across models, 128 + 128 prompts",
                     "shared": len(overlap(load(f"{a}_refusal"), load(f"{b}_refusal")))})
        for half_a, half_b in (("A", "A"), ("A", "B"), ("B", "A")):
            kind = "across models, same half" if half_a == half_b else "across models, disjoint halves"
            rows.append({"a": f"{a} refusal half {half_a}", "b": f"{b} refusal half {half_b}", "kind": kind,
                         "shared": len(overlap(load(f"{a}_refusal_half{half_a}"), load(f"{b}_refusal_half{half_b}")))})
    for model in models:
        rows.append({"a": f"{model} refusal half A", "b": f"{model} refusal half B",
                     "kind": "noise floor: one model, disjoint halves",
                     "shared": len(overlap(load(f"{model}_refusal_halfA"), load(f"{model}_refusal_halfB")))})
        rows.append({"a": f"{model} refusal", "b": f"{model} capitals", "kind": "one model, unrelated task",
                     "shared": len(overlap(load(f"{model}_refusal"), load(f"{model}_capitals")))})
    for row in rows:
        row["share"] = row["shared"] / 200
    return rows


def contrast_change(models: list[str], out: Path) -> list[dict]:
    """Where each fine-tune moved the harmful-vs-harmless contrast: the top 200 neurons by |delta(model) -
    delta(before)| on the same refusal discovery prompts (statistics from the cache the circuits filled)."""
    deltas = {}
    for model in models:
        job = localisation_config(model, "refusal")
        statistics = job_statistics(job, load_model(job.model.spec()), StatisticsCache(job.cache.dir))
        sets, position = prepare_data(job).sets, job.method.position
        deltas[model] = contrastive_scores(statistics.activations(sets.positive, "positive", position=position),
                                           statistics.activations(sets.negative, "negative", position=position)).delta
    rows = []
    for model in models:
        if model == "before" or "before" not in deltas:
            continue
        change = NeuronScores(deltas[model] - deltas["before"], deltas[model], deltas["before"])
        circuit = select_circuit(change, model=f"{model} - before", k=200, sign="abs")
        circuit.save(out / "circuits" / f"{model}_refusal_change.json")
        half = circuit.n_layers // 2
        per_layer = (deltas[model] - deltas["before"]).abs().sum(1)
        rows.append({"model": model, **localisation(circuit, 200),
                     "first_half": sum(n.layer < half for n in circuit.neurons) / circuit.k,
                     "change_mass_first_half": float(per_layer[:half].sum() / per_layer.sum()),
                     "layers_most": sorted(((layer, count) for layer, count in circuit.layer_counts.items() if count),
                                           key=lambda item: -item[1])[:3]})
    return rows


def steer(models: list[str], out: Path, recipe: str, jbb: int) -> list[dict]:
    """Each model steered by every model's circuit and its random control, at each multiplier."""
    folder = out / "steering"
    folder.mkdir(parents=True, exist_ok=True)
    circuits = {f"{source} {kind}": Circuit.load(out / "circuits" / f"{source}_steer_{recipe}{suffix}.json")
                for source in models for kind, suffix in (("circuit", ""), ("random", "_random"))}
    rows = []
    for model in models:
        job = steering_config(model, recipe, jbb)
        data = prepare_data(job)
        lm, evaluator = None, None
        for (name, circuit), multiplier in itertools.product(circuits.items(), MULTIPLIERS):
            if multiplier == 1.0 and name != f"{model} circuit":
                continue  # m = 1 is the unsteered model, whatever the circuit
            path = folder / f"{model}__{name.replace(' ', '_')}__m{multiplier:g}.json"
            if not path.is_file():
                if lm is None:
                    lm = load_model(job.model.spec())
                    evaluator = Evaluator(session_for(job, lm), data.metrics)
                    evaluator.setup()
                started = time.perf_counter()
                point, records, _ = evaluator.point(1.0 - multiplier, multiplier,
                                                    NeuronScale(lm.adapter, circuit).multiply(multiplier))
                write_json_atomic(path, {"model": model, "circuit": name, "k": circuit.k, "multiplier": multiplier,
                                         "point": point.to_dict(), "records": records,
                                         "seconds": round(time.perf_counter() - started, 1)})
            result = read_json(path)
            rows.append({key: result[key] for key in ("model", "circuit", "k", "multiplier", "point", "records")})
    return rows


def behaviour_table(folders: list[Path]) -> list[dict]:
    """The unsteered point of each job of `launch.py experiment=base_vs_aligned` under these sweep folders."""
    rows = []
    for path in sorted({p.resolve() for folder in folders for p in folder.glob("*/results.json")}):
        results = read_json(path)
        if results.get("status") != "complete":
            continue
        point = results["points"][0]
        sets = {**point.get("over_refusal", {}), **point.get("generalisation", {})}
        rows.append({"model": results["model"], "jbb": (point["refusal_rate"], point["refusal_ci95"]),
                     **{name: (sets[name]["rate"], sets[name]["ci95"]) for name in ("advbench", "xstest_safe")
                        if name in sets},
                     "quality": point["quality"], "mmlu": (point["mmlu_accuracy"], point["mmlu_ci95"])})
    return rows


def _rate(value) -> str:
    return "-" if value is None or value[0] is None else f"{value[0]:.2f} [{value[1][0]:.2f}, {value[1][1]:.2f}]"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def summary(behaviour: list[dict], localised: list[dict], overlaps: list[dict], changes: list[dict],
            steered: list[dict], recipe: str) -> str:
    lines = ["# Base against aligned on a model organism (benchmarks/base_vs_aligned.py)", "",
             "## Behaviour, unsteered (launch.py experiment=base_vs_aligned)", "",
             "| model | JBB refusal | AdvBench refusal | XSTest safe refused | quality (JBB) | MMLU |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {_rate(r['jbb'])} | {_rate(r.get('advbench'))} | {_rate(r.get('xstest_safe'))} | "
              f"{r['quality']:.3f} | {_rate(r['mmlu'])} |" for r in behaviour]
    lines += ["", "## Localisation of the top 200 by |delta| (no universal filter)", "",
             "| model | task | final 3 layers | final quarter | most populated layers |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {_pct(r['final_3_layers'])} | {_pct(r['final_quarter'])} | "
              + ", ".join(f"L{layer} {count}" for layer, count in r["layers_most"]) + " |" for r in localised]
    lines += ["", "## Overlap of top-200 circuits", "", "| circuit A | circuit B | comparison | shared | share |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['a']} | {r['b']} | {r['kind']} | {r['shared']} / 200 | {_pct(r['share'])} |" for r in overlaps]
    lines += ["", "## Where the fine-tune moved the contrast: top 200 by |delta(model) - delta(before)|", "",
              "| model | final 3 layers | final quarter | first half | share of total change in the first half | "
              "most populated layers |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {_pct(r['final_3_layers'])} | {_pct(r['final_quarter'])} | {_pct(r['first_half'])} | "
              f"{_pct(r['change_mass_first_half'])} | "
              + ", ".join(f"L{layer} {count}" for layer, count in r["layers_most"]) + " |" for r in changes]
    lines += ["", f"## Steering with each model's circuit (recipe {recipe}) and random controls", "",
              "| model | circuit | k | m | JBB refusal [95% CI] | probes refused | quality | KL |",
              "|---|---|---|---|---|---|---|---|"]
    for r in steered:
        p = r["point"]
        probes = p["over_refusal"].get("probes", {})
        kl = "-" if p["kl_divergence"] is None else f"{p['kl_divergence']:.3f}"
        lines.append(f"| {r['model']} | {r['circuit']} | {r['k']} | {r['multiplier']:g} | {p['refusal_rate']:.2f} "
                     f"[{p['refusal_ci95'][0]:.2f}, {p['refusal_ci95'][1]:.2f}] | "
                     f"{round(probes.get('rate', 0) * probes.get('n', 0))} / {probes.get('n', 0)} | "
                     f"{p['quality']:.3f} | {kl} |")
    lines += ["", "## Probe generations (first 100 characters)", ""]
    for r in steered:
        for record in r["records"]:
            if record["set"] == "probes":
                text = record["response"].replace("\n", " ").replace("|", "/")[:100]
                lines.append(f"- {r['model']}, {r['circuit']}, m = {r['multiplier']:g}, \"{record['prompt']}\": "
                             f"{text}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steer-models", nargs="+", default=["before", "after"], choices=list(MODELS))
    parser.add_argument("--recipe", default="paper", help="conf/recipe of the steering circuits")
    parser.add_argument("--jbb", type=int, default=100, help="JBB goals per steered point")
    parser.add_argument("--behaviour", type=Path, nargs="*", default=[],
                        help="the hydra.sweep.dir(s) of launch.py experiment=base_vs_aligned")
    args = parser.parse_args()
    started = time.perf_counter()
    notes = discover_circuits(args.models, args.out, args.recipe)
    localised, overlaps = localisation_table(args.models, args.out), overlap_table(args.models, args.out)
    changes = contrast_change(args.models, args.out)
    steered = steer(args.steer_models, args.out, args.recipe, args.jbb)
    with (args.out / "generations.jsonl").open("w") as handle:
        for row in steered:
            for record in row["records"]:
                handle.write(json.dumps({"model": row["model"], "circuit": row["circuit"],
                                         "multiplier": row["multiplier"], **record}) + "\n")
    behaviour = behaviour_table(args.behaviour)
    write_json_atomic(args.out / "results.json", {
        "behaviour": behaviour, "localisation": localised, "overlap": overlaps, "contrast_change": changes,
        "discovery": notes, "recipe": args.recipe,
        "steering": [{k: v for k, v in row.items() if k != "records"} for row in steered],
        "seconds": round(time.perf_counter() - started, 1)})
    (args.out / "summary.md").write_text(summary(behaviour, localised, overlaps, changes, steered, args.recipe))
    print(args.out / "summary.md")


if __name__ == "__main__":
    main()
