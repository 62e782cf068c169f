import json

import pytest

from cna.circuit import Circuit, Neuron, ResidualDirection, localisation, overlap

CONTRACT_KEYS = {"model", "method", "k", "k_fraction", "neurons", "universal_removed", "layer_counts", "n_layers",
                 "neurons_per_layer", "prompts"}


def make_circuit(keys, n_layers=24, method="cna"):
    neurons = [Neuron(layer, index, float(len(keys) - rank), 1.0, 0.0) for rank, (layer, index) in enumerate(keys)]
    return Circuit("m", method, neurons, n_layers=n_layers, neurons_per_layer=100, k_fraction=0.001,
                   universal_removed=2, prompts={"positive": 8, "negative": 8, "sha256": "ab"})


def test_circuit_json_follows_the_output_contract(tmp_path):
    circuit = make_circuit([(23, 5), (23, 1), (10, 7)])
    path = circuit.save(tmp_path / "circuit.json")
    data = json.loads(path.read_text())
    assert set(data) >= CONTRACT_KEYS
    assert data["k"] == 3 and data["universal_removed"] == 2 and data["n_layers"] == 24
    assert data["neurons"][0] == {"layer": 23, "index": 5, "delta": 3.0, "positive_mean": 1.0, "negative_mean": 0.0,
                                  "score": None}
    assert data["score"] == "delta"  # what ranked the neurons; older files without it load as delta
    assert data["layer_counts"]["23"] == 2 and data["layer_counts"]["10"] == 1 and data["layer_counts"]["0"] == 0
    assert Circuit.load(path) == circuit
    assert [p.name for p in tmp_path.iterdir()] == ["circuit.json"]  # no temporary file left behind


def test_overlap_is_the_shared_layer_index_pairs():
    a = make_circuit([(1, 2), (3, 4), (5, 6)])
    b = make_circuit([(5, 6), (1, 2), (1, 3)])
    assert overlap(a, b) == [(1, 2), (5, 6)]
    assert overlap(a, make_circuit([(0, 0)])) == []


def test_localisation_counts_final_three_layers_and_final_quarter():
    # 24 layers: the final quarter starts at layer 18, the final three at 21.
    circuit = make_circuit([(23, 0), (21, 0), (20, 0), (18, 0), (17, 0), (2, 0), (0, 0), (22, 9)])
    result = localisation(circuit, top_n=4)
    assert result == {"n": 4, "final_3_layers": 0.5, "final_quarter": 1.0, "final_quarter_start_layer": 18}
    everything = localisation(circuit)
    assert everything["n"] == 8 and everything["final_3_layers"] == 3 / 8 and everything["final_quarter"] == 5 / 8
    with pytest.raises(ValueError):
        localisation(make_circuit([]))


def test_residual_direction_round_trips_with_layers_and_norm(tmp_path):
    direction = ResidualDirection("m", "caa", source_layer=12, layers=[12], vector=[3.0, 4.0], n_layers=24)
    data = json.loads(direction.save(tmp_path / "circuit.json").read_text())
    assert data["vector_norm"] == 5.0 and data["layers"] == [12] and "neurons" not in data
    assert ResidualDirection.load(tmp_path / "circuit.json") == direction
