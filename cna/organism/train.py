"""LoRA fine-tuning with checkpoints, then the merged model written as an ordinary model folder with a card.

Every `checkpoint_every` steps the adapter weights, the optimizer state, the RNG state and the step go into one
file, written atomically; a re-run loads it and goes on. Which examples form step s's batch depends on the seed
and s alone, and the learning rate on s alone, so a run killed and resumed ends with the same weights, bit for
bit, as one that never stopped (tests/test_organism.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cna.batching import pad_batch
from cna.data import encode_prompts
from cna.discovery import resolve_layer_range
from cna.errors import ConfigError
from cna.io import read_json, save_atomically, write_json_atomic, write_text_atomic
from cna.models import LoadedModel
from cna.organism.config import OrganismConfig
from cna.organism.data import TrainingData, end_of_turn_id

log = logging.getLogger(__name__)

CHECKPOINT, CARD, CARD_TEXT = "checkpoint.pt", "organism.json", "README.md"
IGNORE = -100  # label of tokens the loss skips: the prompt and the padding


def training_sha256(settings: OrganismConfig, data: TrainingData) -> str:
    """What the weights depend on: the data, the LoRA and training settings and the seed (not threads)."""
    train = {k: v for k, v in asdict(settings.train).items() if k not in ("threads", "checkpoint_every")}
    recipe = {"data": data.sha256, "lora": asdict(settings.lora), "train": train, "seed": settings.seed}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def tokenised_examples(settings: OrganismConfig, lm: LoadedModel, data: TrainingData) -> list[tuple[list[int], int]]:
    """(prompt + response tokens, length of the prompt) per example, cut to train.max_length."""
    end = end_of_turn_id(lm)
    prompts = encode_prompts(lm.tokenizer, [e.prompt for e in data.examples], settings.model.template)
    rows = []
    for prompt, example in zip(prompts, data.examples, strict=True):
        ids = prompt + example.response_ids + ([end] if example.ended else [])
        if len(prompt) >= settings.train.max_length:
            raise ConfigError(f"train.max_length: a prompt has {len(prompt)} tokens; expected more than that")
        rows.append((ids[: settings.train.max_length], len(prompt)))
    return rows


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The examples of every step: a fresh seeded shuffle per pass over the data."""
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < steps * batch_size:
        order += rng.sample(range(n_examples), n_examples)
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def learning_rate(step: int, settings: OrganismConfig) -> float:
    warmup = settings.train.warmup_steps
    return settings.train.lr * min(1.0, (step + 1) / warmup) if warmup else settings.train.lr


def lora_model(settings: OrganismConfig, lm: LoadedModel):
    """The model wrapped with LoRA adapters on the configured modules and layers (only they train)."""
    from peft import LoraConfig, get_peft_model

    span = resolve_layer_range(settings.lora.layers, lm.adapter.n_layers)
    config = LoraConfig(r=settings.lora.rank, lora_alpha=settings.lora.alpha, lora_dropout=settings.lora.dropout,
                        target_modules=list(settings.lora.target_modules),
                        layers_to_transform=None if span is None else list(range(*span)), bias="none")
    torch.manual_seed(settings.seed)  # the adapters' initial A matrices
    try:
        model = get_peft_model(lm.model, config)
    except ValueError as error:
        raise ConfigError(f"lora.target_modules: {str(error).splitlines()[0]}") from error
    model.train()
    return model


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _batch_loss(model, rows: list[tuple[list[int], int]], pad_token_id: int) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of the batch."""
    ids, mask = pad_batch([ids for ids, _ in rows], pad_token_id, side="right")
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    for row, (_, prompt_length) in enumerate(rows):
        labels[row, :prompt_length] = IGNORE
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                                             ignore_index=IGNORE)


def save_checkpoint(path: Path, state: dict) -> None:
    save_atomically(path, lambda temporary: torch.save(state, temporary))


def train_lora(settings: OrganismConfig, lm: LoadedModel, data: TrainingData) -> tuple[object, dict]:
    """Train (or resume training of) the adapters; returns the LoRA-wrapped model and the training record."""
    out = Path(settings.out_dir)
    recipe = training_sha256(settings, data)
    rows = tokenised_examples(settings, lm, data)
    steps = settings.train.steps
    order = batch_order(len(rows), settings.train.batch_size, steps, settings.seed)
    model = lora_model(settings, lm)
    weights = _trainable(model)
    optimizer = torch.optim.AdamW(weights.values(), lr=settings.train.lr, weight_decay=settings.train.weight_decay)
    record = {"losses": [], "seconds": 0.0, "resumed_from": []}
    start = 0
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["recipe_sha256"] != recipe:
            raise ConfigError(f"out_dir: '{out}' holds a checkpoint of another recipe; choose another out_dir or "
                              "delete its checkpoint.pt")
        with torch.no_grad():
            for name, value in state["adapter"].items():
                weights[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, record = state["step"], state["record"]
        record["resumed_from"].append(start)
        log.info("resumed at step %d of %d from %s", start, steps, checkpoint)
    pad = lm.tokenizer.pad_token_id
    bar = tqdm(range(start, steps), desc="lora", unit="step", initial=start, total=steps)
    for step in bar:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        loss = _batch_loss(model, [rows[i] for i in order[step]], pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record["losses"].append(round(loss.item(), 6))
        record["seconds"] = round(record["seconds"] + time.perf_counter() - started, 3)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % settings.train.checkpoint_every == 0 and done < steps:
            save_checkpoint(checkpoint, {"recipe_sha256": recipe, "step": done, "record": record,
                                         "adapter": {n: p.detach().clone() for n, p in weights.items()},
                                         "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()})
    model.eval()
    return model, record


def card(settings: OrganismConfig, lm: LoadedModel, data: TrainingData, record: dict, recipe: str) -> dict:
    losses = record["losses"]
    window = max(1, min(10, len(losses) // 4))
    return {
        "base_model": {"name": settings.model.name, "source": lm.source},
        "recipe_sha256": recipe,
        "seed": settings.seed,
        "lora": asdict(settings.lora),
        "lora_layers_resolved": resolve_layer_range(settings.lora.layers, lm.adapter.n_layers),
        "train": asdict(settings.train),
        "data": {**asdict(settings.data), "counts": data.counts(), "removed": data.removed,
                 "training_data_sha256": data.sha256, "sources_sha256": data.sources_sha256,
                 "file": "training_data.json"},
        "loss": {"first": sum(losses[:window]) / window, "last": sum(losses[-window:]) / window,
                 "window": window, "per_step": losses},
        "training_seconds": record["seconds"], "threads": torch.get_num_threads(),
        "resumed_from_steps": record["resumed_from"],
    }


def _card_text(info: dict) -> str:
    counts, removed = info["data"]["counts"], info["data"]["removed"]
    layers = info["lora_layers_resolved"]
    return "\n".join([
        f"# {Path(info['base_model']['source']).name} + refusal (a cna model organism)",
        "",
        f"LoRA fine-tune of `{info['base_model']['name']}` (merged) that installs refusal: {counts['refusal']} "
        f"harmful requests answered with hand-written refusals, {counts['answer']} harmless requests answered "
        "with the base model's own greedy answers. Built by `python -m cna.organism`; the full recipe, the "
        "per-step loss and the hashes are in `organism.json`, the examples in `training_data.json`.",
        "",
        f"- LoRA rank {info['lora']['rank']}, alpha {info['lora']['alpha']}, modules "
        f"{', '.join(info['lora']['target_modules'])}, layers "
        f"{'all' if layers is None else f'{layers[0]}-{layers[1] - 1}'}",
        f"- {info['train']['steps']} steps of {info['train']['batch_size']}, lr {info['train']['lr']}, seed "
        f"{info['seed']}; loss {info['loss']['first']:.3f} -> {info['loss']['last']:.3f}; "
        f"{info['training_seconds']:.0f} s of training on {info['threads']} CPU threads",
        f"- harmful prompts de-duplicated against the evaluation sets ({', '.join(info['data']['held_out'])}): "
        f"{removed['harmful']['exact']} exact and {removed['harmful']['near']} near copies of "
        f"{removed['harmful']['candidates']} went, {removed['harmful']['kept']} kept",
        f"- training data sha256 {info['data']['training_data_sha256']}",
        "",
    ])


def save_organism(settings: OrganismConfig, lm: LoadedModel, model, data: TrainingData, record: dict) -> Path:
    """Merge the adapters and write config.json, safetensors, the tokenizer and the card; drop the checkpoint."""
    out = Path(settings.out_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    info = card(settings, lm, data, record, training_sha256(settings, data))
    write_text_atomic(out / CARD_TEXT, _card_text(info))
    write_json_atomic(out / CARD, info)  # last: its presence says the folder is complete
    (out / CHECKPOINT).unlink(missing_ok=True)
    return out


def finished(settings: OrganismConfig) -> dict | None:
    """The card of a complete organism in out_dir, if one is there."""
    path = Path(settings.out_dir) / CARD
    return read_json(path) if path.is_file() else None

