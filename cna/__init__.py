"""cna: contrastive neuron attribution (arXiv 2605.12290).

Find the few MLP neurons whose activation differs most between a positive and a negative prompt set, then
steer a model by scaling them at inference time. The library, in a notebook:

    import cna
    model, tokenizer = cna.load_model("smollm2-135m-instruct")
    circuit = cna.discover(model, tokenizer, positive_prompts, negative_prompts, k_fraction=0.001)
    with cna.steer(model, circuit, alpha=1.0):
        ...
    results = cna.evaluate(model, tokenizer, [cna.Refusal(goals)], alphas=[0, 1], intervention=circuit)

`launch.py` (Hydra, W&B) runs the same functions as sweeps of jobs.
"""

from cna.api import (
    Results,
    caa,
    direction,
    discover,
    evaluate,
    export_baked,
    export_orthogonalised,
    generate,
    intervention_for,
    load_model,
    steer,
)
from cna.circuit import Circuit, Neuron, ResidualDirection
from cna.data import read_prompt_file as read_prompts
from cna.errors import CnaError, ConfigError
from cna.evaluation.compliance import Compliance
from cna.evaluation.kl import Kl
from cna.evaluation.metric import Metric, register_metric
from cna.evaluation.mmlu import Mmlu, MmluQuestion, load_mmlu_folder, stratified_sample
from cna.evaluation.over_refusal import OverRefusal
from cna.evaluation.quality import Quality
from cna.evaluation.refusal import Refusal
from cna.interventions import Intervention
from cna.methods import register_method
from cna.methods.base import SteeringMethod

__all__ = ["Circuit", "CnaError", "Compliance", "ConfigError", "Intervention", "Kl", "Metric", "Mmlu",
           "MmluQuestion", "Neuron", "OverRefusal", "Quality", "Refusal", "ResidualDirection", "Results",
           "SteeringMethod", "caa", "direction", "discover", "evaluate", "export_baked", "export_orthogonalised",
           "generate", "intervention_for", "load_mmlu_folder", "load_model", "read_prompts", "register_metric",
           "register_method", "steer", "stratified_sample"]
__version__ = "0.1.0"
