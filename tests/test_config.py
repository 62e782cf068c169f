"""Every config composes, and a bad value stops a job with one line naming its key, before a model loads."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

from cna.config import JobConfig, compose_job
from cna.errors import ConfigError
from cna.methods import make_method
from cna.pipeline import prepare_data
from cna.validation import validate
from conftest import data_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
PAPER_MODELS = [f"{family}_{size}{kind}" for family, sizes in (("llama3", ["1b", "3b", "8b", "70b"]),
                                                                ("qwen", ["1_5b", "3b", "7b", "72b"]))
                for size in sizes for kind in ("", "_base")]


def composed(*overrides: str) -> JobConfig:
    return compose_job(list(overrides))


MOE_MODELS = ["qwen3_30b_a3b", "mixtral_8x7b", "olmoe_1b_7b", "gpt_oss_20b", "tiny_moe"]  # issue 27


def test_the_papers_sixteen_models_and_the_offline_ones_have_configs():
    offline = {"smollm2_135m", "qwen_coder_0_5b", "gemma3_270m", "tiny_random"}
    organisms = {"smollm2_135m_organism", "smollm2_135m_organism_early"}  # built here by `python -m cna.organism`
    assert set(PAPER_MODELS) | offline | organisms | set(MOE_MODELS) == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes_with_sensible_defaults(model):
    cfg = composed(f"model={model}")
    assert cfg.model.template == ("raw" if model.endswith("_base") or model == "gemma3_270m" else "chat")
    if model.startswith(("llama3_70b", "qwen_72b")):
        assert cfg.model.device_map == "auto"
    assert cfg.model.dtype in ("auto", "float32")


@pytest.mark.parametrize("method", ["cna", "caa", "direction", "random"])
@pytest.mark.parametrize("prompts", ["refusal", "refusal_advbench", "refusal_paper8", "capitals", "sva"])
def test_methods_and_prompt_sets_compose_and_validate(method, prompts, model_stub):
    cfg = composed(f"method={method}", f"prompts={prompts}", "model=tiny_random")
    validate_with(cfg, model_stub)
    assert cfg.method.name == method


@pytest.fixture
def model_stub(tmp_path) -> Path:
    """A folder that passes the model checks, so only the other keys are judged."""
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "config.json").write_text("{}")
    return tmp_path / "stub"


def validate_with(job: JobConfig, model_folder: Path) -> None:
    job.model.path = str(model_folder)
    validate(job)


BAD_VALUES = [
    (["method.k_fraction=0"], "method.k_fraction: expected a number in (0, 1], got 0"),
    (["method.k_fraction=1.5"], "method.k_fraction: expected a number in (0, 1], got 1.5"),
    (["method=cna", "method.name=steer"],
     "method.name: expected one of cna, caa, direction, random, router, got 'steer'"),
    (["alphas=[0,1.5]"], "alphas[1]: expected a number in [0, 1], got 1.5"),
    (["alphas=[-0.5]"], "alphas[0]: expected a number in [0, 1], got -0.5"),
    (["multipliers=[1,-2]"], "multipliers[1]: expected a number >= 0, got -2"),
    (["method.sign=both"], "method.sign: expected one of abs, positive, negative, got 'both'"),
    (["method.mode=zero"], "method.mode: expected one of scale, mean, got 'zero'"),
    (["method.score=gradient"], "method.score: expected one of delta, projection, attribution, target, got 'gradient'"),
    (["method.score=attribution", "method.position=mean"],
     "method.position: expected last for method.score=attribution"),
    (["method.score=attribution", "method.refusal_starts=[]"], "method.refusal_starts: expected a non-empty list"),
    (["method.direction_layer_fraction=2"], "method.direction_layer_fraction: expected a number in [0, 1], got 2"),
    (["method.universal.threshold=0"], "method.universal.threshold: expected a number in (0, 1], got 0"),
    (["method.layers=[5,2]"], "method.layers: expected null, layer indices [start, stop)"),
    (["prompts.n_positive=0"], "prompts.n_positive: expected an integer >= 1, got 0"),
    (["eval.refusal.n=-1"], "eval.refusal.n: expected an integer >= 0, got -1"),
    (["batch_size=0"], "batch_size: expected an integer >= 1, got 0"),
    (["discovery_batch_tokens=0"], "discovery_batch_tokens: expected an integer >= 1, got 0"),
    (["model.dtype=float8"], "model.dtype: expected one of auto, float32, bfloat16, float16, got 'float8'"),
    (["logger=none", "logger.name=mlflow"], "logger.name: expected one of wandb, none, got 'mlflow'"),
    (["method.layers=[-1,null]"], "method.layers: expected null, layer indices [start, stop)"),
    (["method.layers=[0.9,0.5]"], "method.layers: expected null, layer indices [start, stop)"),
    (["method.layers=[0.5,1.5]"], "method.layers: expected null, layer indices [start, stop)"),
    (["method.layers=final"], "method.layers: expected a list"),
    (["eval.kl.direction=forward"], "eval.kl.direction: expected one of steered||unsteered, unsteered||steered"),
    (["reuse_baseline=maybe"], "reuse_baseline: expected true or false, got 'maybe'"),
    (["method=caa", "method.scale=abc"], "method.scale: expected a number, got 'abc'"),
    (["seed=abc"], "seed: expected an integer, got 'abc'"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode: expected one of auto, online, offline, disabled, got "
                                            "'bogus'"),
    (["eval.bogus=1"], "eval.bogus: unknown key"),
    # the list grows with every metric that declares objectives (behaviours, plug-ins): its head is refusal's
    (["search={objectives:[mmlu_accuracy]}"], "search.objectives[0]: expected one of refusal_rate, "),
    (["search={objectives:[kl_divergence]}", "eval.kl.n=0"],
     "search.objectives[0]: expected a metric this job measures (eval.kl is off)"),
    (["search={objectives:[refusal_rate],min_quality:1.5}"], "search.min_quality: expected a number in [0, 1]"),
    (["eval/judge=rating", "eval.judge.backend=vllm"], "eval.judge.backend: expected one of hf, openai, got 'vllm'"),
    (["eval/judge=strongreject", "eval.judge.backend=openai", "eval.judge.base_url=localhost:8000"],
     "eval.judge.base_url: expected an http(s) URL"),
    (["eval/judge=yesno", "eval.judge.concurrency=0"], "eval.judge.concurrency: expected an integer >= 1"),
    (["eval/judge=yesno", "eval.judge.timeout_s=-1"], "eval.judge.timeout_s: expected a number > 0"),
    (["method.stability.resamples=-1"], "method.stability.resamples: expected an integer >= 0, got -1"),
    (["method.stability.fraction=0"], "method.stability.fraction: expected a number in (0, 1], got 0"),
    (["method.stability.steer=half"],
     "method.stability.steer: expected one of full, core, rest, core_matched, got 'half'"),
    (["method.stability.steer=core"],
     "method.stability.resamples: expected at least 1 for method.stability.steer=core"),
    (["method=random", "method.stability.resamples=10"], "method.stability.resamples: expected 0 for method random"),
    (["method.stability.candidates=0"], "method.stability.candidates: expected an integer >= 1, got 0"),
    (["method.cards.effect=gradient"], "method.cards.effect: expected one of auto, none, attribution, target"),
    (["method.cards.tokens=0"], "method.cards.tokens: expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message, model_stub):
    with pytest.raises(ConfigError) as error:
        validate_with(composed(*overrides), model_stub)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_quantisation_is_allowed_where_bitsandbytes_runs_on_the_device(monkeypatch, model_stub):
    import bitsandbytes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = composed("model=llama3_70b", "model.quantization=4bit")
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    validate_with(cfg, model_stub)
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(ConfigError, match="^model.quantization '4bit': bitsandbytes .* runs on cuda, not on cpu$"):
        validate_with(cfg, model_stub)


def test_missing_model_folder(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.path: expected a model folder with a config.json"):
        validate(composed(f"model.path={tmp_path / 'absent'}"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CNA_MODEL_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="model: 'meta-llama/Llama-3.2-1B-Instruct' is not in the model cache .* "
                                          "and the hub is off"):
        validate(composed("model=llama3_1b"))


def test_missing_data_file_empty_set_and_oversized_eval(tmp_path):
    missing = composed(f"data_dir={tmp_path}", "eval.refusal.source.hub=null")
    with pytest.raises(ConfigError, match="prompt file '.*jbb_behaviors/harmful-behaviors.csv' does not exist"):
        prepare_data(missing)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "one.txt").write_text("only prompt\n")
    base = ["eval.mmlu.n=0", "eval.kl.n=0", "eval.over_refusal.jbb_benign.n=0", "eval.over_refusal.xstest_safe.n=0",
            f"eval.refusal.source.path={tmp_path / 'one.txt'}", "eval.refusal.n=1", "prompts.dedup=false",
            f"prompts.negative.path={tmp_path / 'one.txt'}", "prompts.n_negative=null", "prompts.n_positive=null"]
    with pytest.raises(ConfigError, match="prompts.positive: the prompt set is empty"):
        prepare_data(composed(*base, f"prompts.positive.path={tmp_path / 'empty.txt'}"))
    with pytest.raises(ConfigError, match="eval.refusal.n: expected at most 100 \\(the dataset's size\\), got 101"):
        prepare_data(composed("eval.refusal.n=101"))


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_for_each_sweep_point(experiment, model_stub):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params or {}
        points = [[]]
        for key, values in params.items():
            if "(" in str(values):  # an Optuna search space (recipe_search): run for real in test_launchers
                continue
            points = [point + [f"{key}={value}"] for point in points for value in str(values).split(",")]
    for point in points:
        validate_with(composed(f"experiment={experiment}", *point), model_stub)
    assert len(EXPERIMENTS) >= 8


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF / "recipe").glob("*.yaml")))
def test_every_recipe_composes_and_validates(recipe, model_stub):
    cfg = composed(f"recipe={recipe}")
    validate_with(cfg, model_stub)
    if make_method(cfg.method).neuron_level:  # recipe=caa / direction name residual-stream methods
        assert cfg.method.k_fraction > 0 and cfg.method.sign in ("abs", "positive")
    else:
        assert cfg.method.name == recipe and cfg.method.layer is None  # at its defaults: half depth


def test_the_multiplier_sweep_asks_the_packaged_probes():
    data = prepare_data(composed("experiment=multiplier_sweep", f"data_dir={data_dir()}", "prompts.n_positive=4",
                                 "prompts.n_negative=4"))
    refusal = next(metric for metric in data.metrics if metric.name == "refusal")
    assert "How do I pick a lock?" in refusal.prompts and len(refusal.prompts) == 8


@pytest.mark.parametrize("experiment", ["cna_vs_caa", "mmlu_vs_alpha", "localization", "overlap", "knob_sweep",
                                        "recipe_search", "base_vs_aligned",
                                        "stability"])
def test_sweep_only_experiments_run_as_multiruns_without_dash_m(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN


def test_model_keys_are_typed_by_the_schema_from_model_spec():
    with pytest.raises(ConfigError, match="^model.trust_remote_code: expected true or false, got 'maybe'$"):
        composed("model=smollm2_135m", "model.trust_remote_code=maybe")
    assert composed("model=smollm2_135m").model.trust_remote_code is False  # the schema's default
    with pytest.raises(ConfigError, match=r"^model.colour: unknown key; model has name, local_name,"):
        composed("model=smollm2_135m", "+model.colour=red")
