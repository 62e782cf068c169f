import pytest
import torch

from cna.circuit import Circuit, Neuron
from cna.errors import ConfigError
from cna.hooks import attached, read_input, read_output
from cna.interventions import NeuronScale
from cna.models import FAMILIES, ArchitectureAdapter, ModelSpec, UnsupportedModelError, load_model, resolve_source
from cna.tiny import MOE_CONFIGS
from conftest import FAMILY_CONFIGS, tiny_model


def test_every_supported_family_has_a_tiny_test_config():
    """Dense families here; mixtures of experts in cna.tiny (tested in tests/test_moe.py)."""
    assert set(FAMILY_CONFIGS) | set(MOE_CONFIGS) == set(FAMILIES)
    assert not set(FAMILY_CONFIGS) & set(MOE_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_adapter_finds_layers_neuron_sites_and_residual(model_type):
    model = tiny_model(model_type)
    adapter = ArchitectureAdapter(model)
    assert (adapter.n_layers, adapter.neurons_per_layer, adapter.hidden_size) == (2, 64, 32)
    neuron_widths, residual_widths = [], []
    hooks = [read_input(site, lambda x: neuron_widths.append(x.shape[-1])) for site in adapter.neuron_sites]
    hooks += [read_output(layer, lambda x: residual_widths.append(x.shape[-1])) for layer in adapter.layers]
    ids = torch.randint(4, 64, (2, 5))
    with attached(hooks), torch.inference_mode():
        plain = model(input_ids=ids).logits
    assert neuron_widths == [64, 64] and residual_widths == [32, 32]
    # Row j of the neuron-major weight view is what neuron j writes: zeroing it equals ablating the neuron.
    assert adapter.neuron_weights(1).shape == (64, 32)
    circuit = Circuit(model_type, "cna", [Neuron(1, j, 1.0, 1.0, 0.0) for j in range(0, 64, 2)], 2, 64)
    with NeuronScale(adapter, circuit).steer(1.0), torch.inference_mode():
        ablated = model(input_ids=ids).logits
    assert not torch.allclose(ablated, plain)


def test_unsupported_model_fails_with_one_line_naming_it():
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "mamba2"})()
    with pytest.raises(UnsupportedModelError) as error:
        ArchitectureAdapter(model)
    message = str(error.value)
    assert "\n" not in message and "'mamba2'" in message and "llama" in message and "gpt2" in message


def test_resolution_order_is_path_then_cache_then_hub(tiny_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "tiny-local").mkdir(parents=True)
    (cache / "tiny-local" / "config.json").write_text("{}")
    monkeypatch.setenv("CNA_MODEL_CACHE", str(cache))
    spec = ModelSpec(name="org/tiny", local_name="tiny-local")
    explicit = ModelSpec(name="org/tiny", local_name="tiny-local", path=str(tiny_folder))
    assert resolve_source(explicit) == str(tiny_folder)
    assert resolve_source(spec) == str(cache / "tiny-local")
    assert resolve_source(ModelSpec(name="org/tiny", local_name="absent")) == "org/tiny"
    monkeypatch.delenv("CNA_MODEL_CACHE")
    assert resolve_source(spec) == "org/tiny"


def test_missing_explicit_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.path '.*nowhere' is not a model folder"):
        resolve_source(ModelSpec(name="org/tiny", path=str(tmp_path / "nowhere")))


def test_loaded_model_is_float32_on_cpu_in_eval_mode_without_gradients(tiny_folder):
    loaded = load_model(ModelSpec(name="org/tiny", path=str(tiny_folder), device="cpu"))
    parameters = list(loaded.model.parameters())
    assert {p.dtype for p in parameters} == {torch.float32}
    assert {p.device.type for p in parameters} == {"cpu"}
    assert not loaded.model.training and not any(p.requires_grad for p in parameters)
    assert loaded.adapter.n_layers == 3 and loaded.tokenizer.pad_token_id == 0
    assert loaded.source == str(tiny_folder)


def test_dtype_can_be_chosen(tiny_folder):
    loaded = load_model(ModelSpec(name="org/tiny", path=str(tiny_folder), device="cpu", dtype="bfloat16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype 'float8'"):
        load_model(ModelSpec(name="org/tiny", path=str(tiny_folder), dtype="float8"))


def test_unknown_quantisation_is_rejected(tiny_folder):
    with pytest.raises(ConfigError, match="model.quantization '3bit' is not one of"):
        load_model(ModelSpec(name="org/tiny", path=str(tiny_folder), quantization="3bit"))
