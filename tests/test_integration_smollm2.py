"""The engine on a real model: SmolLM2-135M-Instruct from ../shared/models/fetch (30 x 1,536 = 46,080 neurons)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cna.data import encode_prompts, packaged_prompts, read_prompt_file
from cna.discovery import collect_statistics, contrastive_scores, select_circuit, universal_neurons
from cna.generation import eos_token_ids, generate
from cna.hooks import hook_count
from cna.interventions import NeuronScale, export_baked_model
from cna.models import ModelSpec, load_model
from conftest import data_dir

pytestmark = pytest.mark.integration

SHOWN = ["How do I pick a lock?", "Write a poem about the sea.", "Explain how to hotwire a car.",
         "What is the capital of France?"]


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    return load_model(ModelSpec(name="HuggingFaceTB/SmolLM2-135M-Instruct", path=str(smollm2_folder)))


@pytest.fixture(scope="module")
def circuit(smollm2):
    tokenizer, adapter = smollm2.tokenizer, smollm2.adapter
    splits = data_dir() / "harmful_harmless_splits"
    sets = {name: read_prompt_file(splits / f"{name}_train.json", "instruction")[:16]
            for name in ("harmful", "harmless")}
    stats = {name: collect_statistics(adapter, encode_prompts(tokenizer, prompts), pad_token_id=tokenizer.pad_token_id,
                                      progress=False) for name, prompts in sets.items()}
    diverse = collect_statistics(adapter, encode_prompts(tokenizer, packaged_prompts("diverse")),
                                 pad_token_id=tokenizer.pad_token_id, top_fraction=0.001, progress=False)
    return select_circuit(contrastive_scores(stats["harmful"], stats["harmless"]), model="smollm2",
                          universal=universal_neurons(diverse, 0.8))


def greedy(loaded, model=None):
    prompts = encode_prompts(loaded.tokenizer, SHOWN)
    return generate(model or loaded.model, prompts, pad_token_id=loaded.tokenizer.pad_token_id,
                    eos_token_id=eos_token_ids(loaded.model, loaded.tokenizer), max_new_tokens=24, progress=False)


def test_circuit_is_one_tenth_of_a_percent_of_all_neurons(smollm2, circuit):
    assert smollm2.adapter.total_neurons == 46_080
    assert circuit.k == 46 and sum(circuit.layer_counts.values()) == 46
    assert len({n.key for n in circuit.neurons}) == 46


def test_alpha_zero_is_bit_identical_on_a_real_model(smollm2, circuit):
    ids = torch.tensor([encode_prompts(smollm2.tokenizer, SHOWN[:1])[0]])
    with torch.inference_mode():
        plain = smollm2.model(input_ids=ids).logits
        with NeuronScale(smollm2.adapter, circuit).steer(0.0):
            assert torch.equal(smollm2.model(input_ids=ids).logits, plain)


def test_ablation_changes_generations_and_baked_export_matches_hooks(smollm2, circuit, tmp_path):
    plain = greedy(smollm2)
    with NeuronScale(smollm2.adapter, circuit).multiply(0.0):
        ablated = greedy(smollm2)
    assert ablated != plain
    folder = export_baked_model(smollm2.model, smollm2.tokenizer, smollm2.adapter, circuit, 0.0, tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hook_count(baked) == 0
    assert greedy(smollm2, baked) == ablated
    assert greedy(smollm2) == plain  # exporting left the loaded model unchanged
