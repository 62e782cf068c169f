"""Shared pieces of the vLLM engine's tests: interventions of every kind on a loaded transformers model."""

from __future__ import annotations

import torch

from cna.circuit import Circuit, Neuron, ResidualDirection
from cna.engines.vllm import VllmEngine, VllmEngineConfig
from cna.generation import eos_token_ids
from cna.interventions import DirectionAblation, NeuronScale, SteeringVector
from cna.models import ModelSpec, load_model

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "What is the capital of France?",
           "Explain how a bicycle works in detail, step by step.", "Give me three tips for sleeping well.",
           "Translate 'good morning' into Spanish."]


def interventions(adapter, seed: int = 0) -> dict:
    """Every kind the engine steers: neuron scaling (scale, mean) at each position mode, CAA, directional ablation."""
    generator = torch.Generator().manual_seed(seed)
    neurons = [Neuron(layer, int(index), 1.0, 1.0, 0.5) for layer in range(0, adapter.n_layers, 3)
               for index in torch.randperm(adapter.neurons_per_layer, generator=generator)[:40]]
    circuit = Circuit("test", "cna", neurons, adapter.n_layers, adapter.neurons_per_layer)
    layer = adapter.n_layers // 2
    direction = ResidualDirection(model="test", method="caa", source_layer=layer, n_layers=adapter.n_layers,
                                  vector=(3 * torch.randn(adapter.hidden_size, generator=generator)).tolist(),
                                  layers=[layer])
    found = {f"cna {mode} {positions}": NeuronScale(adapter, circuit, mode=mode, positions=positions)
             for mode in ("scale", "mean") for positions in ("all", "prompt", "generated")}
    found.update({f"caa {positions}": SteeringVector(adapter, direction, positions=positions)
                  for positions in ("all", "prompt", "generated")})
    found["direction all"] = DirectionAblation(adapter, direction)
    found["direction generated"] = DirectionAblation(adapter, direction, positions="generated")
    return found


def start(folder, **settings):
    """The transformers model and a vLLM engine on the same folder (float32, CPU)."""
    lm = load_model(ModelSpec(name="test", path=str(folder), dtype="float32", device="cpu"))
    config = VllmEngineConfig(**{"kv_cache_gib": 1, "max_model_len": 1024, **settings})
    return lm, VllmEngine(config, str(folder), dtype="float32", stop_token_ids=eos_token_ids(lm.model, lm.tokenizer))
