import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from cna.circuit import Circuit, Neuron, ResidualDirection
from cna.report import (
    NoRunsError,
    find_runs,
    main,
    overlap_matrix,
    pareto_front,
    point_row,
    run_plots,
    table_fields,
    table_header,
    write_report,
)
from cna.run_folder import Point

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QWEN, SMOL = "Qwen/Qwen2.5-Coder-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
N_LAYERS = 24

# (layer, index) keys: the two qwen cna circuits share 3 neurons, qwen and smol share 1.
QWEN_KEYS = [(23, 5), (23, 9), (22, 1), (21, 4), (12, 7), (3, 3)]
QWEN_K2_KEYS = [(23, 5), (23, 9), (22, 1), (20, 0), (19, 8), (1, 1), (2, 2), (5, 5)]
SMOL_KEYS = [(23, 5), (10, 10), (11, 11), (0, 4)]

# The known point: qwen/cna at alpha 0.5.
KNOWN = {"alpha": 0.5, "multiplier": 0.5, "refusal_rate": 0.42, "refusal_ci95": [0.3247, 0.5213], "quality": 0.8731,
         "quality_ci95": [0.85, 0.9], "degenerate_rate": 0.03, "n_prompts": 100, "over_refusal_rate": 0.08,
         "over_refusal_ci95": [0.041, 0.151], "over_refusal": {"xstest": {"rate": 0.08, "ci95": [0.041, 0.151],
                                                                           "n": 100}},
         "mmlu_accuracy": 0.455, "mmlu_ci95": [0.4242, 0.4861], "kl_divergence": 0.01234}
EXPECTED_FIGURES = {"refusal_quality_vs_alpha", "mmlu_vs_alpha", "kl_vs_alpha", "over_refusal_vs_alpha",
                    "refusal_vs_kl", "layer_histogram", "circuit_overlap"}


def make_point(alpha: float, neuron: bool, refusal: float) -> dict:
    return {"alpha": alpha, "multiplier": 1 - alpha if neuron else None, "refusal_rate": refusal,
            "refusal_ci95": [max(0.0, refusal - 0.1), min(1.0, refusal + 0.1)], "quality": 0.9 - 0.1 * alpha,
            "quality_ci95": [0.85 - 0.1 * alpha, 0.95 - 0.1 * alpha], "degenerate_rate": 0.02 * alpha,
            "n_prompts": 100, "over_refusal_rate": 0.1 * (1 - alpha), "over_refusal_ci95": [0.0, 0.2],
            "over_refusal": {"xstest": {"rate": 0.1 * (1 - alpha), "ci95": [0.0, 0.2], "n": 100}},
            "mmlu_accuracy": 0.46 - 0.02 * alpha, "mmlu_ci95": [0.43, 0.49], "kl_divergence": 0.05 * abs(alpha)}


def make_circuit(model: str, keys, method: str = "cna") -> Circuit:
    neurons = [Neuron(layer, index, float(len(keys) - rank), 1.0, 0.0) for rank, (layer, index) in enumerate(keys)]
    return Circuit(model, method, neurons, n_layers=N_LAYERS, neurons_per_layer=896, k_fraction=0.001,
                   prompts={"positive": 8, "negative": 8, "sha256": "ab"})


def make_run(root: Path, model: str, method: str, overrides: list[str], keys=None, status: str = "complete",
             points: list[dict] | None = None) -> Path:
    run_dir = root / ",".join(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    neuron = method in ("cna", "random")
    if points is None:
        points = [make_point(a, neuron, r) for a, r in [(0.0, 0.6), (0.5, 0.3), (1.0, 0.05)]]
    results = {"model": model, "method": method, "status": status, "config_sha256": "0" * 64, "points": points,
               "timings_s": {"discovery": 12.5, "generation": 30.0}, "cache": {"hits": 1, "misses": 2}}
    (run_dir / "results.json").write_text(json.dumps(results))
    if keys is not None:
        make_circuit(model, keys, method).save(run_dir / "circuit.json")
    elif not neuron:
        ResidualDirection(model, method, source_layer=12, layers=[12], vector=[3.0, 4.0], n_layers=N_LAYERS).save(
            run_dir / "circuit.json")
    return run_dir


@pytest.fixture
def multirun(tmp_path) -> Path:
    """Two models x two methods (3 points each), plus an incomplete second qwen/cna job with a larger k."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    qwen_points = [make_point(0.0, True, 0.61), KNOWN, make_point(1.0, True, 0.02)]
    make_run(root, QWEN, "cna", ["model=qwen_coder_0_5b", "method=cna"], QWEN_KEYS, points=qwen_points)
    make_run(root, QWEN, "caa", ["model=qwen_coder_0_5b", "method=caa"])
    make_run(root, SMOL, "cna", ["model=smollm2_135m", "method=cna"], SMOL_KEYS)
    make_run(root, SMOL, "caa", ["model=smollm2_135m", "method=caa"])
    make_run(root, QWEN, "cna", ["model=qwen_coder_0_5b", "method=cna", "method.k_fraction=0.002"], QWEN_K2_KEYS,
             status="running", points=[make_point(0.0, True, 0.6)])
    return tmp_path / "multirun"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50


def test_write_report_writes_every_figure_and_the_summary(multirun):
    written = write_report(multirun)
    assert set(written) == EXPECTED_FIGURES | {"summary"}
    for name in EXPECTED_FIGURES:
        assert written[name] == multirun / f"{name}.png"
        assert_png(written[name])
    assert written["summary"] == multirun / "summary.md"


def test_summary_lists_runs_points_circuits_and_figures(multirun):
    summary = write_report(multirun)["summary"].read_text()
    for name in ("Qwen2.5-Coder-0.5B-Instruct", "SmolLM2-135M-Instruct", "/cna", "/caa"):
        assert name in summary
    # The known point, formatted as printed: alpha, m, then each metric's fields in the registry's order (refusal
    # [CI], quality [CI], degenerate, over-refusal [CI], MMLU [CI], KL), n.
    row = ("| Qwen2.5-Coder-0.5B-Instruct/cna [method.k_fraction=default] | Qwen2.5-Coder-0.5B-Instruct | cna "
           "| 0.5 | 0.5 | 0.420 [0.325, 0.521] | 0.873 [0.850, 0.900] | 0.030 | 0.080 [0.041, 0.151] "
           "| 0.455 [0.424, 0.486] | 0.01234 | 100 |")
    assert row in summary
    # The incomplete job is there, marked, and told apart from its sibling by the override that differs.
    assert "Qwen2.5-Coder-0.5B-Instruct/cna [method.k_fraction=0.002] (incomplete)" in summary
    assert summary.count("(incomplete)") >= 2  # runs table and points table
    # One section per neuron circuit with k, non-zero layer counts and localisation.
    assert summary.count("### ") == 3
    assert "k = 6 (0.1000% of all MLP neurons), 24 layers x 896 neurons" in summary
    assert "neurons per layer (non-zero): L3: 1, L12: 1, L21: 1, L22: 1, L23: 2" in summary
    # qwen: top 6 neurons, 4 in layers 21-23 and 4 in the final quarter (layers 18-23).
    assert "localisation of the top 6 by |delta|: 66.7% in the final 3 layers, 66.7% in the final quarter" in summary
    assert "mean difference at layer 12, edits layer 12, |v| = 5" in summary
    # Pairwise overlap, as a share of the smaller circuit: the two qwen circuits (k 6 and 8) share 3 neurons.
    assert ("| Qwen2.5-Coder-0.5B-Instruct/cna [method.k_fraction=default] | Qwen2.5-Coder-0.5B-Instruct/cna "
            "[method.k_fraction=0.002] (incomplete) | 3 / 6 | 50.0% |") in summary
    for name in EXPECTED_FIGURES:
        assert f"]({name}.png)" in summary


def test_point_row_formats_missing_metrics_as_na(multirun):
    runs, _ = find_runs(multirun)
    fields = table_fields(runs)
    assert table_header(fields)[5:] == ["refusal rate [95% CI]", "quality [95% CI]", "degenerate",
                                        "over-refusal [95% CI]", "MMLU [95% CI]", "KL", "n"]
    point = Point.from_dict({"alpha": 0.25, "multiplier": None, "refusal_rate": 0.5, "refusal_ci95": [0.4, 0.6],
                             "quality": 0.9, "mmlu_accuracy": None, "kl_divergence": None, "n_prompts": 10})
    row = point_row(runs[0], point, fields)
    assert row[3:] == ["0.25", "n/a", "0.500 [0.400, 0.600]", "0.900", "n/a", "n/a", "n/a", "n/a", "10"]


def test_overlap_matrix_counts_shared_layer_index_pairs():
    a, b = make_circuit(QWEN, QWEN_KEYS), make_circuit(QWEN, QWEN_K2_KEYS)
    matrix = overlap_matrix([a, b])
    assert matrix.tolist() == [[6, 3], [3, 8]]


def test_overlap_matrix_of_the_run_folders(multirun):
    runs, _ = find_runs(multirun)
    with_circuit = [run for run in runs if run.circuit is not None]
    labels = [run.label for run in with_circuit]
    matrix = overlap_matrix([run.circuit for run in with_circuit])
    qwen, qwen_k2 = (labels.index(f"Qwen2.5-Coder-0.5B-Instruct/cna [{suffix}]")
                     for suffix in ("method.k_fraction=default", "method.k_fraction=0.002"))
    smol = labels.index("SmolLM2-135M-Instruct/cna")
    assert matrix[qwen, qwen_k2] == matrix[qwen_k2, qwen] == 3
    assert matrix[qwen, smol] == 1
    assert matrix[qwen, qwen] == 6 and matrix[smol, smol] == 4


def test_labels_tell_apart_runs_of_one_model_and_method(multirun, tmp_path):
    runs, skipped = find_runs(multirun)
    assert skipped == []
    labels = sorted(run.label for run in runs)
    assert labels == ["Qwen2.5-Coder-0.5B-Instruct/caa", "Qwen2.5-Coder-0.5B-Instruct/cna [method.k_fraction=0.002]",
                      "Qwen2.5-Coder-0.5B-Instruct/cna [method.k_fraction=default]", "SmolLM2-135M-Instruct/caa",
                      "SmolLM2-135M-Instruct/cna"]
    # Without overrides, the folder (relative to the report root) tells them apart.
    other = tmp_path / "outputs"
    for name in ("a", "b"):
        run_dir = make_run(other / name, SMOL, "caa", ["x"])
        (run_dir / ".hydra" / "overrides.yaml").unlink()
    assert sorted(run.label for run in find_runs(other)[0]) == ["SmolLM2-135M-Instruct/caa [a/x]",
                                                                "SmolLM2-135M-Instruct/caa [b/x]"]


def test_contract_only_circuit_and_unreadable_results(tmp_path):
    run_dir = make_run(tmp_path, QWEN, "cna", ["method=cna"])
    contract = {"model": QWEN, "method": "cna", "k": 2, "k_fraction": 0.001, "n_layers": 4, "neurons_per_layer": 8,
                "neurons": [{"layer": 3, "index": 1, "delta": 2.0}, {"layer": 0, "index": 5, "delta": -1.0}],
                "universal_removed": 0, "layer_counts": {"0": 1, "3": 1}, "prompts": {}}
    (run_dir / "circuit.json").write_text(json.dumps(contract))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    written = write_report(tmp_path)
    assert "layer_histogram" in written and "circuit_overlap" not in written
    summary = written["summary"].read_text()
    assert "neurons per layer (non-zero): L0: 1, L3: 1" in summary
    assert "## Unreadable results" in summary and "broken" in summary


def test_run_without_points_still_gets_a_figure(tmp_path):
    make_run(tmp_path, QWEN, "cna", ["method=cna"], QWEN_KEYS, status="running", points=[])
    written = write_report(tmp_path)
    assert set(written) == {"refusal_quality_vs_alpha", "layer_histogram", "summary"}
    assert_png(written["refusal_quality_vs_alpha"])
    assert "No finished points yet." in written["summary"].read_text()


def test_run_plots_on_one_run_folder(multirun):
    run_dir = next(p.parent for p in multirun.rglob("results.json") if "k_fraction" not in str(p)
                   and "smollm2" not in str(p) and "method=cna" in str(p))
    written = run_plots(run_dir)
    assert set(written) == EXPECTED_FIGURES - {"circuit_overlap"}
    for path in written.values():
        assert path.parent == run_dir
        assert_png(path)
    assert not (run_dir / "summary.md").exists()
    with pytest.raises(FileNotFoundError):
        run_plots(multirun)


def test_cli_writes_into_out(multirun, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(multirun), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "summary.md") in printed
    assert {p.name for p in out.iterdir()} == {f"{name}.png" for name in EXPECTED_FIGURES} | {"summary.md"}


def test_cli_on_a_folder_without_results_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "cna.report", str(empty)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: no results.json")
    assert done.stdout == ""
    with pytest.raises(NoRunsError):
        write_report(tmp_path / "missing")


def test_overlap_matrix_is_symmetric_with_k_on_the_diagonal():
    circuits = [make_circuit(QWEN, QWEN_KEYS), make_circuit(QWEN, QWEN_K2_KEYS), make_circuit(SMOL, SMOL_KEYS)]
    matrix = overlap_matrix(circuits)
    assert (matrix == matrix.T).all()
    assert np.diag(matrix).tolist() == [6, 8, 4]
    assert matrix[0, 2] == 1 and matrix[1, 2] == 1


def test_pareto_front_keeps_the_undominated_points_above_the_quality_floor(tmp_path):
    def point(alpha, refusal, kl, quality):
        return {"alpha": alpha, "refusal_rate": refusal, "kl_divergence": kl, "quality": quality}

    make_run(tmp_path, QWEN, "cna", ["method=cna"], points=[
        point(0.0, 0.5, 0.0, 0.99),    # unsteered: never on the front
        point(0.5, 0.4, 0.1, 0.99),    # front
        point(1.0, 0.1, 0.5, 0.99)])   # front
    make_run(tmp_path, QWEN, "caa", ["method=caa"], points=[
        point(0.5, 0.4, 0.2, 0.99),    # dominated: same refusal, more KL
        point(1.0, 0.05, 0.3, 0.90)])  # would dominate, but below the quality floor
    make_run(tmp_path, QWEN, "direction", ["method=direction"], points=[point(1.0, 0.2, 0.3, 0.98)])  # front
    runs, _ = find_runs(tmp_path)
    front = [(run.method, point.alpha) for run, point in pareto_front(runs)]
    assert front == [("cna", 0.5), ("direction", 1.0), ("cna", 1.0)]
    assert [run.method for run, _ in pareto_front(runs, quality_floor=0.5)] == ["cna", "caa"]
    summary = write_report(tmp_path)["summary"].read_text()
    section = summary.split("## Pareto front: refusal vs KL at quality >= 0.97")[1].split("## ")[0]
    assert section.count("| method=") == 3 and "| method=caa |" not in section


def test_the_summary_says_which_runs_reduced_refusal_with_intervals(tmp_path):
    from cna.report import effect_sentence, refusal_changes

    def job(name: str, before: float, after: float, n: int = 100, **extra) -> Path:
        from cna.evaluation.intervals import wilson_interval

        points = [{"alpha": alpha, "refusal_rate": rate, "refusal_ci95": list(wilson_interval(round(rate * n), n)),
                   "n_prompts": n} for alpha, rate in ((0.0, before), (1.0, after))]
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"model": "m", "method": name, "status": "complete",
                                                         "points": points, **extra}))
        return folder

    job("cna", 0.53, 0.26)
    job("random", 0.53, 0.55)
    job("caa", 0.30, 0.60, in_sample=True, discovery_overlap={"jbb_harmful": 100, "kl": 0})
    runs, _ = find_runs(tmp_path)
    changes = {c.run.method: c for c in refusal_changes(runs)}
    assert changes["cna"].verdict == "reduced" and changes["cna"].change == pytest.approx(-0.27)
    assert changes["cna"].ci95[0] < -0.27 < changes["cna"].ci95[1] < 0
    assert changes["random"].verdict == "no significant change" and changes["caa"].verdict == "raised"
    sentence = effect_sentence(list(changes.values()))
    assert sentence.startswith("Reduced refusal: m/cna (0.53 [0.43, 0.62] -> 0.26 [") and "did not: " in sentence
    assert "m/random (no significant change: " in sentence and "m/caa (raised: " in sentence
    assert effect_sentence([changes["random"]]).startswith("None of the 1 run(s) reduced refusal: m/random")
    summary = write_report(tmp_path)["summary"].read_text()
    assert sentence in summary and "**In-sample:** 1 run(s)" in summary and "yes (jbb_harmful: 100)" in summary


def test_the_first_sentence_leads_with_harmful_compliance_and_refusal_together(tmp_path):
    from cna.evaluation.intervals import wilson_interval
    from cna.report import effect_sentence, refusal_changes

    def point(alpha: float, refused: int, harmful: int) -> dict:
        return {"alpha": alpha, "refusal_rate": refused / 100, "refusal_ci95": list(wilson_interval(refused, 100)),
                "harmful_compliance_rate": harmful / 100,
                "harmful_compliance_ci95": list(wilson_interval(harmful, 100)), "n_prompts": 100}

    for name, steered in (("cna", point(1.0, 26, 12)), ("caa", point(1.0, 35, 3))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "model": "m", "method": name, "status": "complete", "points": [point(0.0, 53, 2), steered]}))
    runs, _ = find_runs(tmp_path)
    changes = {c.run.method: c for c in refusal_changes(runs)}
    assert changes["cna"].harmful.change == pytest.approx(0.10) and changes["cna"].harmful.direction() == "rose"
    assert changes["caa"].harmful.direction() == "no significant change"
    sentence = effect_sentence([changes["cna"], changes["caa"]])
    assert sentence.startswith("Harmful compliance and refusal, unsteered -> strongest point: m/cna: harmful "
                               "compliance 0.02 [0.01, 0.07] -> 0.12 [")
    assert "rose); refusal 0.53 [0.43, 0.62] -> 0.26 [" in sentence and "(reduced); m/caa: harmful" in sentence
    # the report orders runs by folder; the paragraph after its title and run count is that sentence over all runs
    assert effect_sentence(refusal_changes(runs)) in write_report(tmp_path)["summary"].read_text().split("\n\n")[2]


def test_a_failed_job_shows_its_reason_and_kl_axes_name_the_recorded_direction(tmp_path):
    from cna.report.figures import kl_name

    make_run(tmp_path, QWEN, "cna", ["method.k=999"], status="failed", points=[])
    failed = json.loads((tmp_path / "method.k=999" / "results.json").read_text())
    (tmp_path / "method.k=999" / "results.json").write_text(json.dumps({**failed, "error": "method.k: expected"}))
    make_run(tmp_path, QWEN, "caa", ["method=caa"])
    summary = write_report(tmp_path)["summary"].read_text()
    assert "| failed: method.k: expected |" in summary
    runs, _ = find_runs(tmp_path)
    assert kl_name(runs) == "KL(steered || unsteered)"  # runs from before kl_direction was recorded
    for run in runs:
        run.results.extra["kl_direction"] = "unsteered||steered"
    assert kl_name(runs) == "KL(unsteered || steered)"
    runs[0].results.extra["kl_direction"] = "steered||unsteered"
    assert kl_name(runs).startswith("KL (directions differ")


def test_summary_gives_the_stability_table_and_each_runs_top_neurons(tmp_path):
    from cna.neurons import NeuronCard, write_cards

    root = tmp_path / "multirun"
    run_dir = make_run(root, QWEN, "cna", ["recipe=paper", "method.stability.steer=core"], QWEN_KEYS)
    circuit = Circuit.load(run_dir / "circuit.json")
    circuit.stability = {"resamples": 100, "fraction": 0.5, "jaccard_mean": 0.6125, "jaccard_sd": 0.05,
                         "jaccard_min": 0.5, "jaccard_max": 0.75, "halves_jaccard": 0.55, "core_size": 4, "k": 6,
                         "core_threshold": 0.8, "deepest_rank": 31, "candidates": 2000}
    circuit.settings["stability_subset"] = "core"
    circuit.save(run_dir / "circuit.json")
    cards = [NeuronCard(layer, index, rank + 1, 1.0 - rank / 10, 0.5, 0.6, 0.1, 0.9, [(" sorry", 2.5), ("I", 1.0)],
                        [(" Sure", -3.0)]) for rank, (layer, index) in enumerate(reversed(QWEN_KEYS))]
    write_cards(run_dir, cards[::-1], {"model": QWEN})
    make_run(root, QWEN, "caa", ["method=caa"])
    summary = write_report(root)["summary"].read_text()
    assert ("| Qwen2.5-Coder-0.5B-Instruct/cna | 100 x 50% | 0.613 ± 0.050 [0.500, 0.750] | 0.550 | 4 / 6 (>= 80%) "
            "| 31 / 2000 | core (6) |") in summary
    top = summary[summary.index("## Top neurons"):]
    assert f"[all 6 cards]({run_dir.name}/neurons.md)" in top
    # Five rows, best rank first, with the promoted tokens as written.
    rows = [line for line in top.splitlines() if line.startswith("| L")]
    assert len(rows) == 5 and rows[0].startswith("| L3/N3 | 1 | 1 | 0.900 | ` sorry`, `I` |")
