"""Judge a batch of generated responses: refusal rate and quality, plus one record per response."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cna.evaluation.keywords import KeywordRefusalClassifier, RefusalRate, refusal_rate
from cna.evaluation.quality import QualitySummary, quality_summary

DEFAULT_CLASSIFIER = KeywordRefusalClassifier()


@dataclass(frozen=True)
class ResponseEvaluation:
    refusal: RefusalRate
    quality: QualitySummary
    records: list[dict]  # {"prompt", "response", "refused", "quality"}: a generations.jsonl line, less alpha


def evaluate_responses(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    is_refusal: Callable[[str], bool] = DEFAULT_CLASSIFIER,
    quality_n: int = 3,
) -> ResponseEvaluation:
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt, got {len(prompts)} prompts and {len(responses)} responses")
    refused = [is_refusal(response) for response in responses]
    quality = quality_summary(responses, quality_n)
    records = [
        {"prompt": prompt, "response": response, "refused": flag, "quality": score}
        for prompt, response, flag, score in zip(prompts, responses, refused, quality.scores, strict=True)
    ]
    return ResponseEvaluation(refusal_rate(refused), quality, records)
