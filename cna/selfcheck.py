"""The big-model check list, run on whatever machine this is: `python -m cna.selfcheck` (`make gpu-check`).

A few minutes with a tiny random Llama (and the tiny mixtures of experts), plus a real small model where one is found
(`--model DIR`, else `$CNA_MODEL_CACHE/smollm2-135m-instruct`). Each check prints
`pass`, `FAIL` or `skipped: <why>` (no CUDA, one GPU, flash-attention not installed):
a skipped check is never counted as passed. The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cna.batching import pad_batch
from cna.circuit import ExpertChoice
from cna.discovery import (
    collect_statistics,
    contrastive_scores,
    random_circuit,
    residual_direction,
    select_circuit,
)
from cna.errors import CnaError
from cna.evaluation.kl import kl_divergence
from cna.evaluation.mmlu import letter_token_ids
from cna.evaluation.scoring import next_token_logprobs
from cna.export import export_baked_model
from cna.generation import generate
from cna.interventions import POSITIONS, DirectionAblation, NeuronScale, RouterBias, SteeringVector
from cna.models import MODEL_CACHE_ENV, ArchitectureAdapter, input_device, model_cache
from cna.tiny import MOE_CONFIGS, VOCAB, tiny_moe, write_tiny_model

REAL_MODEL = "smollm2-135m-instruct"
# At most this share of MMLU questions may have a tie for the top letter logit in bfloat16 (arg-max then picks A).
MAX_TIE_SHARE = 0.05


@dataclass
class Outcome:
    status: str  # "pass", "FAIL" or "skipped: <why>"
    detail: str = ""


class Skip(Exception):  # noqa: N818 (a check's way to say it does not apply here)
    pass


def _passed(ok: bool, detail: str) -> Outcome:
    return Outcome("pass" if ok else "FAIL", detail)


def _cuda_devices(needed: int = 1) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise Skip("no CUDA")
    if count < needed:
        raise Skip(f"{count} GPU, needs {needed}")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval().requires_grad_(False)


def _prompts(n: int, seed: int, low: int = 5, high: int = 40, vocab: int = VOCAB) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=generator)
    return [torch.randint(4, vocab, (int(length),), generator=generator).tolist() for length in lengths]


def _statistics(adapter: ArchitectureAdapter, prompts, **options):
    return collect_statistics(adapter, prompts, pad_token_id=0, batch_size=8, progress=False, **options)


def _greedy(model, prompts) -> list[list[int]]:
    # An end token outside the vocabulary: every continuation runs its full length.
    return generate(model, prompts, pad_token_id=0, eos_token_id=[10**6], max_new_tokens=8, progress=False)


def _logits(model, prompts) -> torch.Tensor:
    ids, mask = pad_batch(prompts, pad_token_id=0, side="left")
    device = input_device(model)
    with torch.inference_mode():
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()


# --- the checks ---------------------------------------------------------------------------------------------------

def alpha_zero_identity(folder: Path, vocab: int) -> Outcome:
    """alpha = 0 in bf16 for every intervention and position mode: logits, generations and KL exactly as unsteered."""
    model = _load(folder).to(_device())
    adapter = ArchitectureAdapter(model)
    prompts = _prompts(4, seed=1, vocab=vocab)
    positive = _statistics(adapter, _prompts(16, 2, vocab=vocab))
    negative = _statistics(adapter, _prompts(16, 3, vocab=vocab))
    scores = contrastive_scores(positive, negative)
    circuit = select_circuit(scores, model="selfcheck", k=16)
    direction = residual_direction(positive, negative, model="selfcheck", method="caa",
                                   source_layer=adapter.n_layers // 2, layers=[adapter.n_layers // 2])
    plain_logits, plain_text = _logits(model, prompts), _greedy(model, prompts)
    plain_logprobs = next_token_logprobs(model, prompts, pad_token_id=0, progress=False)
    broken = []
    for positions in POSITIONS:
        for name, intervention in {
            "cna": NeuronScale(adapter, circuit, positions=positions),
            "cna-mean": NeuronScale(adapter, circuit, mode="mean", positions=positions),
            "random": NeuronScale(adapter, random_circuit(circuit, scores, 0), positions=positions),
            "caa": SteeringVector(adapter, direction, positions=positions),
            "direction": DirectionAblation(adapter, direction, positions=positions),
        }.items():
            with intervention.steer(0.0):
                same = (torch.equal(_logits(model, prompts), plain_logits) and _greedy(model, prompts) == plain_text
                        and kl_divergence(next_token_logprobs(model, prompts, pad_token_id=0, progress=False),
                                          plain_logprobs) == 0.0)
            if not same:
                broken.append(f"{name}/{positions}")
    return _passed(not broken, f"{_device().type}, 5 interventions x {len(POSITIONS)} position modes"
                   + (f"; differs: {', '.join(broken)}" if broken else ""))


def two_gpu_sharding(folder: Path, vocab: int) -> Outcome:
    """The layers split over two GPUs give the statistics and generations of one GPU."""
    _cuda_devices(2)
    one = _load(folder, device_map={"": 0})
    n_layers = one.config.num_hidden_layers
    # The tiny model is a Llama: embedding and first half on GPU 0, second half, norm and head on GPU 1.
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
             **{f"model.layers.{i}": int(i >= n_layers // 2) for i in range(n_layers)}}
    two = _load(folder, device_map=split)
    prompts = _prompts(16, seed=4, vocab=vocab)
    a, b = _statistics(ArchitectureAdapter(one), prompts), _statistics(ArchitectureAdapter(two), prompts)
    same = torch.equal(a.neuron_sum, b.neuron_sum) and torch.equal(a.residual_sum, b.residual_sum)
    return _passed(same and _greedy(one, prompts) == _greedy(two, prompts), "statistics and generations equal")


def cpu_spill(folder: Path, vocab: int) -> Outcome:
    """device_map="auto" with too little GPU memory spills layers to CPU; statistics and generations stay the same."""
    _cuda_devices(1)
    whole = _load(folder, device_map={"": 0})
    size = sum(p.numel() * p.element_size() for p in whole.parameters())
    spilled = _load(folder, device_map="auto", max_memory={0: size // 3, "cpu": 4 * size + 2**30})
    on_cpu = sorted(name for name, where in spilled.hf_device_map.items() if where == "cpu")
    if not on_cpu:
        return Outcome("FAIL", "nothing was spilled to the CPU")
    prompts = _prompts(16, seed=5, vocab=vocab)
    a, b = _statistics(ArchitectureAdapter(whole), prompts), _statistics(ArchitectureAdapter(spilled), prompts)
    same = torch.equal(a.neuron_sum, b.neuron_sum) and _greedy(whole, prompts) == _greedy(spilled, prompts)
    return _passed(same, f"{len(on_cpu)} modules on cpu; statistics and generations equal")


def quantised(bits: str) -> Callable[[Path, int], Outcome]:
    def check(folder: Path, vocab: int) -> Outcome:
        """bitsandbytes on CUDA: loads, finite statistics, alpha = 0 bit-identical, export refused."""
        _cuda_devices(1)
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes not installed")
        from transformers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16) if bits == "4bit"
                  else BitsAndBytesConfig(load_in_8bit=True))
        model = _load(folder, quantization_config=config, device_map={"": 0})
        adapter = ArchitectureAdapter(model)
        prompts = _prompts(8, seed=6, vocab=vocab)
        stats = _statistics(adapter, prompts)
        circuit = select_circuit(contrastive_scores(stats, _statistics(adapter, _prompts(8, 7, vocab=vocab))),
                                 model="selfcheck", k=8)
        plain = _logits(model, prompts)
        with NeuronScale(adapter, circuit).steer(0.0):
            identical = torch.equal(_logits(model, prompts), plain)
        try:
            with tempfile.TemporaryDirectory() as out:
                export_baked_model(model, None, adapter, circuit, 0.0, out)
            refused = False
        except CnaError:
            refused = True
        finite = bool(torch.isfinite(stats.neuron_sum).all())
        return _passed(finite and identical and refused,
                       f"finite statistics {finite}, alpha = 0 identical {identical}, export refused {refused}")

    return check


def mean_position(attention: str) -> Callable[[Path, int], Outcome]:
    def check(folder: Path, vocab: int) -> Outcome:
        """position=mean statistics stay finite with left padding (long and short prompts in one batch)."""
        if attention == "flash_attention_2":
            _cuda_devices(1)
            if importlib.util.find_spec("flash_attn") is None:
                raise Skip("flash-attn not installed")
        model = _load(folder, attn_implementation=attention).to(_device())
        prompts = _prompts(4, seed=8, low=2, high=6, vocab=vocab) + _prompts(4, seed=9, low=200, high=300,
                                                                               vocab=vocab)
        stats = collect_statistics(ArchitectureAdapter(model), prompts, pad_token_id=0, batch_size=8,
                                   max_batch_tokens=None, position="mean", progress=False)
        finite = bool(torch.isfinite(stats.neuron_sum).all() and torch.isfinite(stats.residual_sum).all())
        return _passed(finite, f"{_device().type}, {attention}, prompts of 2-300 tokens in one left-padded batch")

    return check


def mmlu_ties(folder: Path, vocab: int) -> Outcome:
    """How often the four MMLU letter logits tie for the top in bf16 (arg-max then picks the first letter).

    On 100 random-token prompts: what matters is how coarse bf16 logits are, not the question.
    """
    from transformers import AutoTokenizer

    model = _load(folder).to(_device())
    letters = letter_token_ids(AutoTokenizer.from_pretrained(folder))
    prompts = _prompts(100, seed=10, low=20, high=60, vocab=vocab)
    logprobs = next_token_logprobs(model, prompts, pad_token_id=0, token_ids=letters, progress=False)
    ties = int(((logprobs == logprobs.max(-1, keepdim=True).values).sum(-1) > 1).sum())
    return _passed(ties <= MAX_TIE_SHARE * len(prompts), f"{ties} of {len(prompts)} questions tie for the top letter")


def top_counts_cpu_vs_cuda(folder: Path, vocab: int) -> Outcome:
    """The universal filter's top counts (float32) are the same on CPU and CUDA."""
    _cuda_devices(1)
    prompts = _prompts(32, seed=11, vocab=vocab)
    counts = [_statistics(ArchitectureAdapter(_load(folder, dtype=torch.float32).to(device)), prompts,
                          top_fraction=0.01).top_counts for device in ("cpu", "cuda")]
    differing = int((counts[0] != counts[1]).sum())
    return _passed(differing == 0, f"{differing} neurons count differently")


def moe_alpha_zero_identity(_folder: Path, vocab: int) -> Outcome:
    """Mixtures of experts (every tiny family) in bf16: alpha = 0 leaves logits and generations exactly as unsteered
    under each experts kernel (on CUDA, grouped_mm runs torch's grouped GEMM)."""
    prompts, broken, runs = _prompts(4, seed=12, vocab=vocab), [], 0
    for family in MOE_CONFIGS:
        model = tiny_moe(family).to(torch.bfloat16).to(_device())
        adapter = ArchitectureAdapter(model)
        statistics = [_statistics(adapter, _prompts(8, seed, vocab=vocab)) for seed in (13, 14)]
        circuit = select_circuit(contrastive_scores(*statistics), model="selfcheck", k=24)
        choice = ExpertChoice("selfcheck", "router", [{"layer": adapter.n_layers - 1, "expert": 1, "shift": -10.0}],
                              adapter.n_layers, adapter.layout.n_routed)
        for kernel in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(kernel)
            plain_logits, plain_text = _logits(model, prompts), _greedy(model, prompts)
            steering = {"cna": NeuronScale(adapter, circuit), "router": RouterBias(adapter, choice),
                        "cna-mean-prompt": NeuronScale(adapter, circuit, mode="mean", positions="prompt")}
            for name, intervention in steering.items():
                runs += 1
                with intervention.steer(0.0):
                    if not (torch.equal(_logits(model, prompts), plain_logits)
                            and _greedy(model, prompts) == plain_text):
                        broken.append(f"{family}/{kernel}/{name}")
    return _passed(not broken, f"{_device().type}, {runs} family x kernel x intervention runs"
                   + (f"; differs: {', '.join(broken)}" if broken else ""))


TINY_CHECKS: dict[str, Callable[[Path, int], Outcome]] = {
    "alpha = 0 bit-identical in bf16": alpha_zero_identity,
    "two-GPU sharding = one GPU": two_gpu_sharding,
    "device_map=auto with CPU spill": cpu_spill,
    "4-bit on CUDA": quantised("4bit"),
    "8-bit on CUDA": quantised("8bit"),
    "mean position finite, SDPA": mean_position("sdpa"),
    "mean position finite, flash-attention 2": mean_position("flash_attention_2"),
    "MMLU letter ties in bf16": mmlu_ties,
    "top_counts CPU = CUDA": top_counts_cpu_vs_cuda,
    "MoE alpha = 0 bit-identical in bf16, every kernel": moe_alpha_zero_identity,
}
REAL_CHECKS = ("alpha = 0 bit-identical in bf16", "mean position finite, SDPA",
               "mean position finite, flash-attention 2", "MMLU letter ties in bf16")


def run_checks(models: dict[str, tuple[Path, int]]) -> list[tuple[str, str, Outcome, float]]:
    rows = []
    for model, (folder, vocab) in models.items():
        for name, check in TINY_CHECKS.items():
            if model != "tiny" and name not in REAL_CHECKS:
                continue
            started = time.perf_counter()
            try:
                outcome = check(folder, vocab)
            except Skip as reason:
                outcome = Outcome(f"skipped: {reason}")
            except Exception as error:  # noqa: BLE001 (a crash is this check's failure, the others still run)
                outcome = Outcome("FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            rows.append((model, name, outcome, time.perf_counter() - started))
            print(f"{outcome.status:<24} {model}: {name}", file=sys.stderr, flush=True)
    return rows


def table(rows) -> str:
    lines = ["| model | check | status | seconds | detail |", "|---|---|---|---|---|"]
    lines += [f"| {model} | {name} | {outcome.status} | {seconds:.1f} | {outcome.detail} |"
              for model, name, outcome, seconds in rows]
    return "\n".join(lines)


def _machine() -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA: {', '.join(names)}; torch {torch.__version__}"
    return f"CPU only ({os.cpu_count()} cores), no CUDA; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cna.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"a real model folder (default: ${MODEL_CACHE_ENV}/{REAL_MODEL} if present)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        models = {"tiny": (write_tiny_model(Path(scratch) / "tiny"), VOCAB)}
        real = Path(args.model) if args.model else model_cache() / REAL_MODEL
        if (real / "config.json").is_file():
            from transformers import AutoConfig

            models[real.name] = (real, AutoConfig.from_pretrained(real).vocab_size)
        rows = run_checks(models)
    print(f"{_machine()}\n\n{table(rows)}")
    return 1 if any(outcome.status == "FAIL" for _, _, outcome, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
