import json

import pytest
from test_pipeline import run, small_job

from cna.cli import main


def test_discover_writes_the_circuit_and_prints_both_columns(tiny_folder, tmp_path, capsys):
    (tmp_path / "pos.txt").write_text("w7 w9\nw7 w10 w11\nw7\n")
    (tmp_path / "neg.csv").write_text("Instruction\nw8 w9\nw8\nw8 w12 w13\n")
    (tmp_path / "eval.csv").write_text("goal\nW7, w10 w11!\n")
    code = main(["discover", "--model", "org/tiny", "--path", str(tiny_folder), "--positive", str(tmp_path / "pos.txt"),
                 "--negative", str(tmp_path / "neg.csv"), "--k", "5", "--show-n", "2", "--max-new-tokens", "4",
                 "--dedup-against", str(tmp_path / "eval.csv"), "--out", str(tmp_path / "out")])
    assert code == 0
    circuit = json.loads((tmp_path / "out" / "circuit.json").read_text())
    assert circuit["k"] == 5 and circuit["prompts"]["positive"] == 2 and circuit["prompts"]["negative"] == 3
    output = capsys.readouterr().out
    assert "positive set: removed 1 exact and 0 near duplicates" in output
    assert "m = 1 (unchanged)" in output and "| m = 0" in output and "k = 5 of 384 neurons" in output


def test_bad_input_is_one_line_on_stderr(tiny_folder, tmp_path, capsys):
    code = main(["discover", "--model", "org/tiny", "--path", str(tiny_folder), "--positive",
                 str(tmp_path / "absent.json"), "--negative", str(tmp_path / "absent.json")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: prompt file") and error.count("\n") == 1


@pytest.mark.parametrize("score", ["delta", "projection", "attribution"])
def test_the_cli_and_the_pipeline_write_the_same_circuit_json(tiny_folder, tmp_path, capsys, score):
    (tmp_path / "pos.txt").write_text("w7 w9\nw7 w10 w11\nw7\nw7 w20 w21 w22\n")
    (tmp_path / "neg.txt").write_text("w8 w9\nw8\nw8 w12 w13\nw8 w30\n")
    assert main(["discover", "--model", "tiny-random", "--path", str(tiny_folder), "--template", "chat",
                 "--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), "--k", "7",
                 "--score", score, "--refusal-starts", "w5", "w6", "--batch-size", "4", "--show-n", "1",
                 "--max-new-tokens", "1", "--out", str(tmp_path / "cli")]) == 0
    cfg = small_job(tiny_folder, tmp_path / "cache", f"prompts.positive.path={tmp_path / 'pos.txt'}",
                    f"prompts.negative.path={tmp_path / 'neg.txt'}", "prompts.n_positive=null",
                    "prompts.n_negative=null", "method.k=7", f"method.score={score}", "method.refusal_starts=[w5,w6]",
                    "eval.refusal.n=0", "eval.over_refusal.jbb_benign.n=0", "eval.over_refusal.xstest_safe.n=0",
                    "eval.mmlu.n=0", "eval.kl.n=0", "alphas=[0.0]")
    run(cfg, tmp_path / "pipeline")
    from_cli = (tmp_path / "cli" / "circuit.json").read_text()
    assert json.loads(from_cli)["settings"]["universal_threshold"] == 0.8
    assert json.loads(from_cli)["score"] == score
    assert from_cli == (tmp_path / "pipeline" / "circuit.json").read_text()
