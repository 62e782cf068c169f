import json

import pytest
import torch

from cna.batching import last_token_index, length_sorted_batches, pad_batch, position_ids
from cna.data import encode_prompts, packaged_prompts, prompt_sets_sha256, read_prompt_file
from cna.errors import ConfigError
from conftest import tiny_tokenizer


def test_prompt_files_of_every_format_with_case_insensitive_columns(tmp_path):
    (tmp_path / "p.csv").write_text("Index,Goal\n0,first\n1,\"second, with comma\"\n")
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "first"}, {"instruction": "second"}]))
    (tmp_path / "p.jsonl").write_text('{"Prompt": "first"}\n\n{"Prompt": "second"}\n')
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    (tmp_path / "strings.json").write_text(json.dumps(["first", "second"]))
    assert read_prompt_file(tmp_path / "p.csv", "goal") == ["first", "second, with comma"]
    assert read_prompt_file(tmp_path / "p.json", "INSTRUCTION") == ["first", "second"]
    assert read_prompt_file(tmp_path / "p.jsonl", "prompt") == ["first", "second"]
    assert read_prompt_file(tmp_path / "p.txt") == ["first", "second"]
    assert read_prompt_file(tmp_path / "strings.json") == ["first", "second"]


def test_bad_prompt_files_are_one_line_errors(tmp_path):
    (tmp_path / "p.csv").write_text("goal\nx\n")
    (tmp_path / "p.parquet").write_text("")
    with pytest.raises(ConfigError, match="no column .behavior.; it has \\['goal'\\]"):
        read_prompt_file(tmp_path / "p.csv", "behavior")
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompt_file(tmp_path / "absent.csv", "goal")
    with pytest.raises(ConfigError, match="suffix '.parquet'"):
        read_prompt_file(tmp_path / "p.parquet")


def test_packaged_diverse_set_has_about_sixty_distinct_prompts():
    prompts = packaged_prompts("diverse")
    assert 55 <= len(prompts) <= 70 and len(set(prompts)) == len(prompts)


def test_chat_and_raw_encoding():
    tokenizer = tiny_tokenizer()
    assert encode_prompts(tokenizer, ["w10 w11"], "chat") == [[1, 10, 11, 4]]
    assert encode_prompts(tokenizer, ["w10 w11"], "raw") == [[10, 11]]
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template; use template 'raw'"):
        encode_prompts(tokenizer, ["w10"], "chat")


def test_prompt_fingerprint_sees_order_and_boundaries():
    assert prompt_sets_sha256(["a", "b"], ["c"]) != prompt_sets_sha256(["a"], ["b", "c"])
    assert prompt_sets_sha256(["a", "b"]) != prompt_sets_sha256(["b", "a"])
    assert prompt_sets_sha256(["a"], ["b"]) == prompt_sets_sha256(["a"], ["b"])


def test_padding_both_sides_gives_last_real_token_and_positions():
    sequences = [[5, 6, 7], [8]]
    for side in ("left", "right"):
        ids, mask = pad_batch(sequences, pad_token_id=0, side=side)
        last = last_token_index(mask)
        assert ids[torch.arange(2), last].tolist() == [7, 8]
        assert position_ids(mask)[mask.bool()].tolist() == [0, 1, 2, 0]
    assert pad_batch(sequences, 0, "left")[0].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_batches_group_similar_lengths_and_cover_every_prompt():
    sequences = [[1] * n for n in [3, 9, 1, 7, 5]]
    batches = list(length_sorted_batches(sequences, 2))
    assert batches == [[1, 3], [4, 0], [2]]
