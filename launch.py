"""The one entry point: compose a config with Hydra and run a job (cna.pipeline.run).

    python launch.py                                             # the defaults in conf/config.yaml
    python launch.py model=smollm2_135m method=caa alphas=[0,1]
    python launch.py -m model=qwen_coder_0_5b,smollm2_135m method=cna,caa   # a multirun
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cna.errors import CnaError
from cna.judge import judge_group_overrides
from cna.pipeline import run, search_objectives


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> list[float] | None:
    """Runs the job; with cfg.search set, returns the objectives a sweeper minimises (experiment=recipe_search)."""
    runtime = HydraConfig.get()
    group = runtime.sweep.dir if runtime.mode == RunMode.MULTIRUN else None
    try:
        results = run(cfg, Path(runtime.runtime.output_dir), group=group)
        return search_objectives(results, cfg.search) if cfg.search else None
    except CnaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv[1:] = judge_group_overrides(sys.argv[1:])  # `eval.judge=NAME` selects the judge's config file
    main()
