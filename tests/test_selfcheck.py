import torch

from cna import selfcheck
from cna.tiny import VOCAB


def test_checks_needing_cuda_are_skipped_not_passed_and_a_crash_is_a_failure(tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def crashes(folder, vocab):
        raise RuntimeError("boom\nsecond line")

    checks = {name: selfcheck.TINY_CHECKS[name] for name in ("two-GPU sharding = one GPU", "4-bit on CUDA",
                                                              "mean position finite, SDPA")}
    monkeypatch.setattr(selfcheck, "TINY_CHECKS", {**checks, "crashes": crashes})
    rows = selfcheck.run_checks({"tiny": (tiny_folder, VOCAB)})
    statuses = {name: outcome.status for _, name, outcome, _ in rows}
    assert statuses == {"two-GPU sharding = one GPU": "skipped: no CUDA", "4-bit on CUDA": "skipped: no CUDA",
                        "mean position finite, SDPA": "pass", "crashes": "FAIL"}
    assert rows[-1][2].detail == "RuntimeError: boom"
    assert "| tiny | 4-bit on CUDA | skipped: no CUDA |" in selfcheck.table(rows)
