"""Every parameter set a W&B sweep file can produce composes into a valid job config."""

import itertools
from pathlib import Path

import pytest
import yaml

from cna.config import compose_job
from cna.validation import validate

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def parameter_sets(sweep: dict) -> list[list[str]]:
    """Hydra overrides, as wandb's ${args_no_hyphens} passes them, for every grid point."""
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        names.append(name)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [[f"{n}={v}" for n, v in zip(names, point, strict=True)] for point in itertools.product(*choices)]


def test_there_are_sweeps_for_k_threshold_alpha_and_model_by_method():
    assert {p.stem for p in SWEEPS} == {"k_fraction_x_threshold", "alpha_grid", "model_x_method"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_point_composes_and_validates(path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "launch.py" and "${args_no_hyphens}" in sweep["command"]
    (tmp_path / "config.json").write_text("{}")
    points = parameter_sets(sweep)
    assert len(points) > 1
    for overrides in points:
        validate(compose_job([*overrides, f"model.path={tmp_path}"]))
