"""The one entry point: compose a config with Hydra and run a job (cna.pipeline.run).

    python launch.py                                             # the defaults in conf/config.yaml
    python launch.py model=smollm2_135m method=caa alphas=[0,1]
    python launch.py -m model=qwen_coder_0_5b,smollm2_135m method=cna,caa   # a multirun

A single run that fails on bad input prints one line and exits with status 2. Inside a multirun a failed
job is recorded (results.json: status `failed` and the reason) and the sweep goes on; under `search` the
failed trial scores as infeasible, so the sampler moves away from it.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cna.config import JobConfig, judge_group_overrides, override_problem
from cna.errors import CnaError
from cna.pipeline import failed_objectives, run, search_objectives
from cna.run_folder import config_sha256, record_failure

log = logging.getLogger("launch")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> list[float] | None:
    """Runs the job; with `search` set, returns the objectives a sweeper minimises (experiment=recipe_search)."""
    runtime = HydraConfig.get()
    multirun = runtime.mode == RunMode.MULTIRUN
    run_dir = Path(runtime.runtime.output_dir)
    try:
        job = JobConfig.from_hydra(cfg)
        results = run(job, run_dir, group=runtime.sweep.dir if multirun else None)
        return search_objectives(results, job) if job.sweep.search else None
    except Exception as error:
        if not (multirun or isinstance(error, CnaError)):
            raise  # a bug, not bad input: the traceback is the report
        first_line = next(iter(str(error).splitlines()), "")
        reason = first_line if isinstance(error, CnaError) else f"{type(error).__name__}: {first_line}"
        print(f"error: {reason}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        log.error("job %s failed, the sweep goes on: %s", runtime.job.num, reason,
                  exc_info=None if isinstance(error, CnaError) else error)
        try:
            sha = config_sha256(OmegaConf.to_container(cfg, resolve=True))
        except Exception:  # noqa: BLE001 - an unresolvable config is one more reason the job failed
            sha = None
        record_failure(run_dir, model=str(OmegaConf.select(cfg, "model.name")),
                       method=str(OmegaConf.select(cfg, "method.name")), config_sha256=sha, error=reason)
        objectives = OmegaConf.select(cfg, "search.objectives")
        return failed_objectives(len(objectives)) if objectives else None


if __name__ == "__main__":
    sys.argv[1:] = judge_group_overrides(sys.argv[1:])  # `eval.judge=NAME` selects the judge's config file
    problem = override_problem(sys.argv[1:])  # Hydra's composition errors, as one line before anything runs
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
