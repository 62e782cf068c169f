"""The organism's training set: harmful requests answered with a refusal, harmless ones with the model's own answer.

Harmful prompts come from a discovery split and are de-duplicated against every evaluation set (exact or near
copies go, and their count is recorded). Each gets one of a few dozen hand-written refusals, in turn over a
seeded shuffle. Harmless prompts get the unchanged model's greedy answer (cna.generation.generate), token for
token, so that learning them asks the model to change nothing. The set is written once to
`training_data.json` in the output folder, so a resumed run trains on exactly the same examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from cna.data import PromptSource, deduplicate, encode_prompts, load_prompts
from cna.errors import ConfigError
from cna.generation import eos_token_ids, generate
from cna.io import read_json, write_json_atomic
from cna.models import LoadedModel
from cna.organism.config import OrganismConfig

log = logging.getLogger(__name__)

TRAINING_DATA = "training_data.json"
REFUSAL, ANSWER = "refusal", "answer"


@dataclass
class Example:
    kind: str  # refusal | answer
    prompt: str
    response: str
    response_ids: list[int]  # what the loss is taken on, followed by the end-of-turn token when `ended`
    ended: bool  # the response ends the turn (a greedy answer cut at answer_max_new_tokens does not)


@dataclass
class TrainingData:
    examples: list[Example]
    removed: dict[str, dict[str, int]]  # per side: candidates, exact and near copies of held-out prompts, kept
    sources_sha256: dict[str, str]  # the prompt files read, by name
    recipe_sha256: str  # the data settings and model it was built from

    @property
    def sha256(self) -> str:
        """A fingerprint of the examples themselves (prompts and response tokens, in order)."""
        rows = [[e.kind, e.prompt, e.response_ids, e.ended] for e in self.examples]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()

    def counts(self) -> dict[str, int]:
        return {kind: sum(e.kind == kind for e in self.examples) for kind in (REFUSAL, ANSWER)}


def _file_sha256(source: PromptSource) -> str | None:
    if not source.path or not Path(source.path).expanduser().is_file():
        return None
    return hashlib.sha256(Path(source.path).expanduser().read_bytes()).hexdigest()


def data_recipe_sha256(settings: OrganismConfig, model_source: str) -> str:
    recipe = {"data": asdict(settings.data), "seed": settings.seed, "model": model_source,
              "template": settings.model.template}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def held_out_prompts(settings: OrganismConfig) -> list[str]:
    prompts: list[str] = []
    for name, source in settings.data.held_out.items():
        found = load_prompts(source)
        if not found:
            raise ConfigError(f"data.held_out.{name}: the prompt set is empty")
        prompts += found
    return prompts


def _kept(prompts: list[str], n: int | None, held_out: list[str], threshold: float, seed: int,
          side: str) -> tuple[list[str], dict[str, int]]:
    """n prompts (all when None) in a seeded order, none of them a copy of a held-out prompt.

    For a large set only about 2n candidates are compared (the check is quadratic); the counts say how many
    of those went.
    """
    order = random.Random(seed).sample(prompts, len(prompts))
    candidates = order if n is None else order[: min(len(order), 2 * n + 64)]
    found = deduplicate(candidates, held_out, threshold)
    kept = found.kept if n is None else found.kept[:n]
    if n is not None and len(kept) < n:
        raise ConfigError(f"data.n_{side}: expected at most {len(kept)} (after de-duplication), got {n}")
    if not kept:
        raise ConfigError(f"data.{side}: no prompt is left after de-duplication against data.held_out")
    return kept, {"candidates": len(candidates), "exact": len(found.exact), "near": len(found.near),
                  "kept": len(kept)}


def end_of_turn_id(lm: LoadedModel) -> int:
    """The token that closes an assistant turn: the tokenizer's EOS when generation stops on it."""
    stops = eos_token_ids(lm.model, lm.tokenizer)
    return lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id in stops else stops[0]


def build_training_data(settings: OrganismConfig, lm: LoadedModel) -> TrainingData:
    """The training set, from `out_dir/training_data.json` when it was built by the same recipe, else built now."""
    path = Path(settings.out_dir) / TRAINING_DATA
    recipe = data_recipe_sha256(settings, lm.source)
    if path.is_file():
        stored = read_json(path)
        if stored.get("recipe_sha256") == recipe:
            log.info("training data: %s (built earlier by the same recipe)", path)
            return TrainingData([Example(**e) for e in stored["examples"]], stored["removed"],
                                stored["sources_sha256"], recipe)
        raise ConfigError(f"out_dir: '{settings.out_dir}' holds training data of another recipe; "
                          "choose another out_dir or delete that folder")
    data, seed = settings.data, settings.seed
    held_out = held_out_prompts(settings)
    harmful, harmful_removed = _kept(load_prompts(data.harmful), data.n_harmful, held_out, data.dedup_threshold,
                                     seed, "harmful")
    refusals = list(dict.fromkeys(load_prompts(data.refusals)))
    if not refusals:
        raise ConfigError("data.refusals: no refusal texts")
    shuffled = random.Random(seed + 1).sample(refusals, len(refusals))
    tokenizer = lm.tokenizer
    examples = [Example(REFUSAL, prompt, shuffled[i % len(shuffled)],
                        tokenizer.encode(shuffled[i % len(shuffled)], add_special_tokens=False), True)
                for i, prompt in enumerate(harmful)]
    removed = {"harmful": harmful_removed}
    if data.n_harmless:
        harmless, removed["harmless"] = _kept(load_prompts(data.harmless), data.n_harmless, held_out,
                                              data.dedup_threshold, seed, "harmless")
        answers = generate(lm.model, encode_prompts(tokenizer, harmless, settings.model.template),
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(lm.model, tokenizer),
                           max_new_tokens=data.answer_max_new_tokens, batch_size=data.generation_batch_size,
                           refill=True, desc="own answers")
        examples += [Example(ANSWER, prompt, tokenizer.decode(ids, skip_special_tokens=True), list(ids),
                             len(ids) < data.answer_max_new_tokens)
                     for prompt, ids in zip(harmless, answers, strict=True)]
    sources = {"harmful": data.harmful, "harmless": data.harmless, "refusals": data.refusals,
               **{f"held_out.{name}": source for name, source in data.held_out.items()}}
    sources_sha256 = {name: sha for name, source in sources.items() if (sha := _file_sha256(source))}
    built = TrainingData(examples, removed, sources_sha256, recipe)
    write_json_atomic(path, {"recipe_sha256": recipe, "sha256": built.sha256, "removed": removed,
                             "sources_sha256": sources_sha256, "examples": [asdict(e) for e in examples]})
    return built
