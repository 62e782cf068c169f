"""Check that every installed package the lock pins has the locked version: `python requirements/check.py LOCK`.

Exits 1 with one line naming each package that drifted. Pins whose environment marker excludes this machine,
and pinned packages that are not installed (CUDA libraries on a CPU machine), are not checked.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def drifted(lock: Path) -> list[str]:
    found = []
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin = Requirement(line)
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        try:
            installed = metadata.version(pin.name)
        except metadata.PackageNotFoundError:
            continue
        # A local label (torch 2.13.0+cpu) satisfies the plain pin (==2.13.0), as pip's own matching does.
        if not pin.specifier.contains(installed, prereleases=True):
            found.append(f"{pin.name} {installed} (locked {pin.specifier})")
    return found


def main(argv: list[str]) -> int:
    lock = Path(argv[1] if len(argv) > 1 else "requirements/dev.lock")
    if not lock.is_file():
        print(f"error: no lock at {lock}: run `make lock`")
        return 1
    found = drifted(lock)
    if found:
        print(f"error: installed versions differ from {lock}: {'; '.join(found)}. "
              "Reinstall with `make clean setup`, or move the lock on purpose with `make lock` and run `make test`.")
        return 1
    print(f"dependencies: every installed package matches {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
