"""`make check-deps` (requirements/check.py): an installed version outside the lock fails in one line."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check_module():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "requirements" / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_drifted_package_is_named_and_other_pins_are_not(tmp_path, capsys):
    check = _check_module()
    pytest_version = metadata.version("pytest")
    torch_release = metadata.version("torch").split("+")[0]
    lock = tmp_path / "dev.lock"
    lock.write_text("\n".join([
        "pytest==0.0.1",
        "    # via cna (pyproject.toml)",
        f"torch=={torch_release}",  # a +cpu build satisfies its plain release
        "no-such-package-anywhere==1.0",  # pinned, not installed: CUDA libraries on a CPU machine
        "numpy==0.0.1 ; sys_platform == 'no-such-platform'",  # a pin for another platform
    ]) + "\n")
    assert check.drifted(lock) == [f"pytest {pytest_version} (locked ==0.0.1)"]
    assert check.main(["check.py", str(lock)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: installed versions differ") and "pytest" in lines[0]
