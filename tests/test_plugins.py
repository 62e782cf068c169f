"""A metric and a steering method added from this file alone (one class and one config each): the pipeline runs
them and they reach results.json, circuit.json, the report's table and the dashboard spec; no other file knows
them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from test_pipeline import run, small_job

from cna import methods
from cna.circuit import Circuit, Neuron
from cna.dashboard import dashboard_spec
from cna.dashboard.spec import history
from cna.evaluation import metric
from cna.evaluation.evaluator import PointContext
from cna.evaluation.metric import DataContext, Field, Metric, register_metric
from cna.interventions import NeuronScale
from cna.methods import register_method
from cna.methods.base import DiscoverySets, Statistics, SteeringMethod
from cna.models import ArchitectureAdapter
from cna.report import write_report
from cna.run_folder import CIRCUIT, RESULTS


@dataclass
class WordsConfig:
    """`eval.words`: how long the refusal set's responses are."""

    per: int = 1  # words per counted unit


class ResponseWords(Metric):
    """Mean words per response of the refusal set (the refusal metric's responses: generated once per point)."""

    name = "words"
    config_type = WordsConfig
    fields = (Field("mean_words", "mean words", digits=".2f", about="Mean words per harmful-set response."),)
    logged_when = "logged only when eval.words is set"

    def __init__(self, sets: dict[str, list[str]], per: int):
        (self.set_name, self.prompts), = sets.items()
        self.per = per

    @classmethod
    def from_config(cls, config: WordsConfig, data: DataContext) -> ResponseWords | None:
        sets = data.evaluated.get("refusal")
        return cls(sets, config.per) if sets else None

    def identity(self) -> dict:
        return {"per": self.per, "prompts": self.prompts}

    def measure(self, point: PointContext) -> dict:
        records = point.responses(self.set_name, self.prompts).records
        return {"mean_words": sum(len(r["response"].split()) / self.per for r in records) / len(records)}


@dataclass
class FirstNeuronsConfig:
    """`method=_first_neurons_schema`: the first k neurons of the last layer, whatever the prompts."""

    name: str = "first_neurons"
    k: int = 2


class FirstNeurons(SteeringMethod):
    name = "first_neurons"
    config_type = FirstNeuronsConfig
    neuron_level = True
    colour = "#ff7f0e"

    def discover(self, statistics: Statistics, sets: DiscoverySets, *, model_name: str) -> Circuit:
        adapter = statistics.adapter
        neurons = [Neuron(adapter.n_layers - 1, j, 0.0, 0.0, 0.0) for j in range(self.config.k)]
        return Circuit(model_name, self.name, neurons, adapter.n_layers, adapter.neurons_per_layer,
                       prompts=sets.provenance())

    def intervention(self, adapter: ArchitectureAdapter, found: Circuit) -> NeuronScale:
        return NeuronScale(adapter, found)


@pytest.fixture
def plugins(monkeypatch):
    """The two plug-ins registered for one test (the registries are restored afterwards)."""
    monkeypatch.setattr(metric, "_REGISTRY", dict(metric._REGISTRY))
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    register_metric(ResponseWords)
    register_method(FirstNeurons)


def test_a_metric_of_one_class_and_one_config_reaches_results_report_and_dashboard(plugins, tiny_folder, tmp_path):
    job = small_job(tiny_folder, tmp_path / "cache", "method.k=4", "+metric@eval.words=_words_schema",
                    "eval.words.per=2", "eval.mmlu.n=0")
    results = run(job, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert saved == results
    for point in saved["points"]:
        assert point["mean_words"] > 0
    responses = [line for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
                 if json.loads(line)["set"] == "jbb_harmful"]
    assert len(responses) == 2 * 4  # shared with the refusal metric: generated once per point
    summary = write_report(tmp_path / "run", tmp_path / "report")["summary"].read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| run | model | method | alpha"))
    assert "| mean words |" in header
    spec = dashboard_spec()
    panel = next(p for p in spec.panels() if history("mean_words") in p.keys)
    assert panel.title == "mean words" and spec.optional[history("mean_words")] == ResponseWords.logged_when


def test_a_method_of_one_class_and_one_config_runs_as_a_job(plugins, tiny_folder, tmp_path):
    job = small_job(tiny_folder, tmp_path / "cache", "method=_first_neurons_schema", "method.k=3",
                    "multipliers=[1.0,0.0]", "eval.mmlu.n=0")
    results = run(job, tmp_path / "run")
    circuit = json.loads((tmp_path / "run" / CIRCUIT).read_text())
    assert circuit["method"] == "first_neurons" and [n["index"] for n in circuit["neurons"]] == [0, 1, 2]
    assert results["method"] == "first_neurons" and [p["multiplier"] for p in results["points"]] == [1.0, 0.0]
    assert results["points"][1]["kl_divergence"] > 0  # the last layer's first neurons, ablated, move the model
    assert dashboard_spec().group_colours["first_neurons"] == "#ff7f0e"
