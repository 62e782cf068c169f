"""Behaviours measured on generated responses: one scorer per response, a rate (or a mean) per held-out set.

Each metric here has the same two sets (conf/behaviour/*.yaml fills them): `target`, the positive side's held-out
prompts, where removal (ablation) should lower the behaviour, and `control`, the negative side's (or neutral)
prompts, where removal should leave it and induction (m > 1) should raise it. Both are generated once per point
(shared with any other metric reading the same set), scored, and every generations.jsonl line of the set gains
its score. The point's `quality` and `degenerate_rate` are those of every response the metric generated (a
behaviour's eval switches the refusal set's quality off).

- `language`: the share of responses in a language, by py3langid (offline, its model ships in the wheel);
- `sentiment`: VADER's compound score (offline, a lexicon), its mean and the share above +0.05 (positive);
- `match`: the share of responses matching any keyword or regular expression;
- `question`: the share an LLM judge answers "yes" to a question about (request, response) (cna judges' backends).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from cna.data import load_prompts
from cna.errors import ConfigError
from cna.evaluation.intervals import bootstrap_interval, wilson_interval
from cna.evaluation.metric import DataContext, EvalSet, Field, Metric, evaluation_set, register_metric
from cna.evaluation.quality import quality_summary
from cna.schema import bounded, choice

if TYPE_CHECKING:
    from cna.evaluation.evaluator import PointContext

SETS = ("target", "control")
BACKENDS = ("hf", "openai")


def rate(flags: Sequence[bool]) -> tuple[float, list[float]]:
    hits = sum(map(bool, flags))
    return hits / len(flags), list(wilson_interval(hits, len(flags)))


class ResponseBehaviour(Metric):
    """A behaviour scored on each response of the target and control sets; subclasses say how."""

    stage: ClassVar[str] = "generation"

    def __init__(self, sets: dict[str, list[str]]):
        self.sets = {role: list(prompts) for role, prompts in sets.items() if prompts}

    @classmethod
    def held_out(cls, config) -> list[str]:
        return [p for role in SETS if getattr(config, role).n != 0 for p in load_prompts(getattr(config, role).source)]

    @classmethod
    def from_config(cls, config, data: DataContext) -> ResponseBehaviour | None:
        sets = {role: _drawn(getattr(config, role), f"eval.{cls.name}.{role}", data.seed) for role in SETS}
        metric = cls.build(config, sets)
        return metric if metric.sets else None

    @classmethod
    @abstractmethod
    def build(cls, config, sets: dict[str, list[str]]) -> ResponseBehaviour:
        """The metric from its checked config and its drawn sets."""

    def set_name(self, role: str) -> str:
        return f"{self.name}_{role}"

    def evaluated_sets(self) -> dict[str, list[str]]:
        return {self.set_name(role): prompts for role, prompts in self.sets.items()}

    def identity(self) -> dict:
        return {"sets": self.sets, "scorer": self.scorer_identity()}

    @abstractmethod
    def scorer_identity(self) -> dict:
        """The scorer's settings (part of the unsteered point's cache key)."""

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
        """(one score per response for its generations.jsonl line, the set's values by quantity with intervals)."""

    def measure(self, point: PointContext) -> dict:
        values, responses = {}, []
        for role, prompts in self.sets.items():
            name = self.set_name(role)
            evaluated = point.responses(name, prompts)
            per_response, summary = self.score(prompts, [r["response"] for r in evaluated.records])
            for record, value in zip([r for r in point.records if r["set"] == name], per_response, strict=True):
                record[self.name] = value
            values.update({f"{role}_{key}": value for key, value in summary.items()})
            values[f"n_{role}"] = len(prompts)
            responses += [r["response"] for r in evaluated.records]
        quality = quality_summary(responses, point.session.quality_n, point.session.seed)
        return {**values, "quality": quality.mean, "quality_ci95": list(quality.ci95),
                "degenerate_rate": quality.degenerate_rate}


def _drawn(eval_set: EvalSet, key: str, seed: int) -> list[str]:
    """The set's prompts: n of them drawn with the seed, all of them for n null, none for 0."""
    if eval_set.n is None:
        return load_prompts(eval_set.source)
    return evaluation_set(eval_set, key, seed)


def _fields(quantity: str, label: str, about: str, digits: str = ".3f") -> tuple[Field, Field]:
    return (Field(f"target_{quantity}", f"target {label}", f"target_{quantity}_ci95", digits,
                  about=f"{about} on the positive side's held-out prompts (removal should lower it)."),
            Field(f"control_{quantity}", f"control {label}", f"control_{quantity}_ci95", digits,
                  about=f"{about} on the negative side's prompts (removal should leave it, m > 1 raise it)."))


# --- language -----------------------------------------------------------------------------------------------------

@dataclass
class LanguageConfig:
    """`eval.language`: the share of responses in `language` (an ISO 639-1 code py3langid knows)."""

    target: EvalSet = field(default_factory=EvalSet)
    control: EvalSet = field(default_factory=EvalSet)
    language: str = "fr"
    candidates: list[str] | None = None  # restrict the identifier to these languages (null: its 97)


def language_identifier(candidates: Sequence[str] | None = None):
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as error:
        raise ConfigError("eval.language needs py3langid: pip install 'cna[behaviours]'") from error
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    if candidates:
        identifier.set_languages(list(candidates))
    return identifier


@register_metric
class Language(ResponseBehaviour):
    name = "language"
    config_type = LanguageConfig
    order = 16
    logged_when = "logged only by behaviour=language (or custom with the language metric)"
    objectives = ("target_language_rate",)
    fields = _fields("language_rate", "language rate", "Share of responses in the target language")

    def __init__(self, sets: dict[str, list[str]], language: str = "fr", candidates: Sequence[str] | None = None):
        super().__init__(sets)
        self.language, self.candidates = language, list(candidates) if candidates else None
        self._identifier = None

    @classmethod
    def check(cls, config: LanguageConfig) -> None:
        known = language_identifier().nb_classes
        for code in [config.language, *(config.candidates or [])]:
            if code not in known:
                raise ConfigError(f"eval.language: expected ISO 639-1 codes py3langid knows, got {code!r}")
        if config.candidates and config.language not in config.candidates:
            raise ConfigError(f"eval.language.candidates: expected a list holding {config.language!r}, "
                              f"got {config.candidates!r}")

    @classmethod
    def build(cls, config: LanguageConfig, sets) -> Language:
        return cls(sets, config.language, config.candidates)

    def scorer_identity(self) -> dict:
        return {"language": self.language, "candidates": self.candidates, "identifier": "py3langid"}

    def identify(self, text: str) -> str:
        if self._identifier is None:
            self._identifier = language_identifier(self.candidates)
        return self._identifier.classify(text)[0] if text.strip() else "none"

    def score(self, prompts, responses):
        found = [self.identify(response) for response in responses]
        value, ci = rate([language == self.language for language in found])
        return found, {"language_rate": value, "language_rate_ci95": ci}


# --- sentiment ----------------------------------------------------------------------------------------------------

@dataclass
class SentimentConfig:
    """`eval.sentiment`: VADER's compound score of each response, in [-1, 1]; above `positive_above` is positive."""

    target: EvalSet = field(default_factory=EvalSet)
    control: EvalSet = field(default_factory=EvalSet)
    positive_above: float = bounded(0.05, -1, 1)  # VADER's own convention


def sentiment_analyser():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ConfigError("eval.sentiment needs vaderSentiment: pip install 'cna[behaviours]'") from error
    return SentimentIntensityAnalyzer()


@register_metric
class Sentiment(ResponseBehaviour):
    name = "sentiment"
    config_type = SentimentConfig
    order = 17
    logged_when = "logged only by behaviour=sentiment (or custom with the sentiment metric)"
    objectives = ("target_sentiment",)
    fields = (*_fields("sentiment", "sentiment", "Mean VADER compound score of the responses", ".3f"),
              *_fields("positive_rate", "positive rate", "Share of responses with compound > +0.05"))

    def __init__(self, sets: dict[str, list[str]], positive_above: float = 0.05):
        super().__init__(sets)
        self.positive_above = positive_above
        self._analyser = None

    @classmethod
    def check(cls, config: SentimentConfig) -> None:
        sentiment_analyser()

    @classmethod
    def build(cls, config: SentimentConfig, sets) -> Sentiment:
        return cls(sets, config.positive_above)

    def scorer_identity(self) -> dict:
        return {"scorer": "vaderSentiment", "positive_above": self.positive_above}

    def compound(self, text: str) -> float:
        if self._analyser is None:
            self._analyser = sentiment_analyser()
        return float(self._analyser.polarity_scores(text)["compound"])

    def score(self, prompts, responses):
        compounds = [self.compound(response) for response in responses]
        value, ci = rate([c > self.positive_above for c in compounds])
        return compounds, {"sentiment": sum(compounds) / len(compounds),
                           "sentiment_ci95": list(bootstrap_interval(compounds)),
                           "positive_rate": value, "positive_rate_ci95": ci}


# --- keyword or regular-expression match --------------------------------------------------------------------------

@dataclass
class MatchConfig:
    """`eval.match`: a response shows the behaviour when any pattern occurs in it."""

    target: EvalSet = field(default_factory=EvalSet)
    control: EvalSet = field(default_factory=EvalSet)
    patterns: list[str] = field(default_factory=list)
    regex: bool = False  # false: patterns are plain keywords
    case_sensitive: bool = False


@register_metric
class Match(ResponseBehaviour):
    name = "match"
    config_type = MatchConfig
    order = 18
    logged_when = "logged only by behaviour=custom with the match metric"
    objectives = ("target_match_rate",)
    fields = _fields("match_rate", "match rate", "Share of responses matching a pattern")

    def __init__(self, sets: dict[str, list[str]], patterns: Sequence[str], *, regex: bool = False,
                 case_sensitive: bool = False):
        super().__init__(sets)
        self.patterns, self.regex, self.case_sensitive = list(patterns), regex, case_sensitive
        flags = 0 if case_sensitive else re.IGNORECASE
        self._compiled = [re.compile(p if regex else re.escape(p), flags) for p in self.patterns]

    @classmethod
    def check(cls, config: MatchConfig) -> None:
        if config.target.n == 0 and config.control.n == 0:
            return  # switched off
        if not config.patterns or not all(isinstance(p, str) and p for p in config.patterns):
            raise ConfigError(f"eval.match.patterns: expected a non-empty list of keywords or regular expressions, "
                              f"got {config.patterns!r}")
        for pattern in config.patterns if config.regex else ():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"eval.match.patterns: {pattern!r} is not a regular expression ({error})") from error

    @classmethod
    def build(cls, config: MatchConfig, sets) -> Match:
        cls.check(config)
        return cls(sets, config.patterns, regex=config.regex, case_sensitive=config.case_sensitive)

    def scorer_identity(self) -> dict:
        return {"patterns": self.patterns, "regex": self.regex, "case_sensitive": self.case_sensitive}

    def score(self, prompts, responses):
        matched = [any(p.search(response) for p in self._compiled) for response in responses]
        value, ci = rate(matched)
        return matched, {"match_rate": value, "match_rate_ci95": ci}


# --- an LLM judge's yes/no question -------------------------------------------------------------------------------

@dataclass
class QuestionConfig:
    """`eval.question`: an LLM judge asked `question` ({prompt} and {response} filled in) about each response;
    "yes" means the response shows the behaviour. The judge's own model, never the steered one."""

    target: EvalSet = field(default_factory=EvalSet)
    control: EvalSet = field(default_factory=EvalSet)
    question: str = "Request: {prompt}\n\nResponse: {response}\n\nDoes the response ...? Answer yes or no."
    backend: str = choice("hf", BACKENDS)  # hf: P(yes) vs P(no) of a local model's next token; openai: its answer
    model: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    local_name: str | None = "qwen2.5-coder-0.5b-instruct"
    path: str | None = None
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    batch_size: int = bounded(8, 1, integer=True)
    max_response_chars: int = bounded(1200, 1, integer=True)


@register_metric
class Question(ResponseBehaviour):
    name = "question"
    config_type = QuestionConfig
    order = 19
    logged_when = "logged only by behaviour=custom with the question (LLM judge) metric"
    objectives = ("target_yes_rate",)
    fields = _fields("yes_rate", "judge yes rate", "Share of responses the LLM judge answers yes about")

    def __init__(self, sets: dict[str, list[str]], config: QuestionConfig):
        super().__init__(sets)
        self.config = config
        self._backend = None

    @classmethod
    def check(cls, config: QuestionConfig) -> None:
        if config.target.n == 0 and config.control.n == 0:
            return  # switched off
        if "{response}" not in config.question:
            raise ConfigError(f"eval.question.question: expected a question holding {{response}} (and optionally "
                              f"{{prompt}}), got {config.question!r}")

    @classmethod
    def build(cls, config: QuestionConfig, sets) -> Question:
        cls.check(config)
        return cls(sets, config)

    def scorer_identity(self) -> dict:
        config = self.config
        return {"question": config.question, "backend": config.backend, "model": config.model,
                "max_response_chars": config.max_response_chars}

    def backend(self):
        if self._backend is None:
            from cna.evaluation.judges.backends import HFBackend, OpenAIBackend
            from cna.models import ModelSpec

            config = self.config
            self._backend = (HFBackend(ModelSpec(name=config.model, local_name=config.local_name, path=config.path),
                                       batch_size=config.batch_size) if config.backend == "hf"
                             else OpenAIBackend(base_url=config.base_url, model=config.model,
                                                api_key_env=config.api_key_env))
        return self._backend

    def score(self, prompts, responses):
        limit = self.config.max_response_chars
        questions = [self.config.question.format(prompt=p, response=r[:limit])
                     for p, r in zip(prompts, responses, strict=True)]
        backend = self.backend()
        if self.config.backend == "hf":
            answers = [p >= 0.5 for p in backend.yes_probability(questions)]
        else:
            answers = [a.strip().lower().startswith("yes") for a in backend.complete(questions, 4)]
        value, ci = rate(answers)
        return answers, {"yes_rate": value, "yes_rate_ci95": ci}
