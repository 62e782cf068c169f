import json

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
