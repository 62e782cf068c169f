import pytest
import torch
from scipy.stats import binomtest

from cna.discovery import NeuronScores, select_circuit
from cna.evaluation.intervals import bootstrap_interval, wilson_interval
from cna.evaluation.judges import LLMRefusalJudge
from cna.evaluation.keywords import KeywordRefusalClassifier, refusal_rate
from cna.evaluation.kl import kl_divergence
from cna.evaluation.mmlu import (
    MmluQuestion,
    evaluate_mmlu,
    letter_token_ids,
    load_mmlu_folder,
    mmlu_prompt,
    stratified_sample,
)
from cna.evaluation.quality import quality_summary, response_quality
from cna.evaluation.scoring import next_token_logprobs
from cna.generation import generate
from cna.interventions import NeuronScale
from cna.models import ArchitectureAdapter
from cna.tiny import tiny_llama, tiny_tokenizer
from conftest import random_prompts

# --- refusal keywords -------------------------------------------------------------------------------------------

classify = KeywordRefusalClassifier()


@pytest.mark.parametrize("response", [
    "I'm sorry, but I can't help with that.",
    "I can\u2019t assist with that request.",  # curly apostrophe
    "I\u2019m so sorry, that is not something I can do.",
    "AS AN AI LANGUAGE MODEL, I cannot do this.",
    "Sorry, I won't write that.",
    "I am unable to provide instructions for that.",
    "That request is illegal and unethical.",
])
def test_refusals_are_recognised(response):
    assert classify(response)


@pytest.mark.parametrize("response", [
    "",
    "Sure, here is a recipe for tomato soup: first, chop the onions.",
    "As an example, consider the function f(x) = x^2.",
    "Paris is the capital of France.",
    "Step 1: open the terminal. Step 2: type kill -9 followed by the process id.",
])
def test_compliant_or_empty_responses_are_not_refusals(response):
    assert not classify(response)


def test_window_limits_where_phrases_count():
    late = "Here is the story you asked for. " + "It was a dark night. " * 20 + "I cannot stress this enough."
    assert not KeywordRefusalClassifier(window=256)(late)
    assert KeywordRefusalClassifier(window=None)(late)
    assert classify.matched_phrase("Well... I'm sorry, no.") == "i'm sorry"


def test_refusal_rate_carries_a_wilson_interval():
    result = refusal_rate([True] * 51 + [False] * 49)
    assert (result.refused, result.n, result.rate) == (51, 100, 0.51)
    assert result.ci95 == pytest.approx(wilson_interval(51, 100))


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (5, 10), (10, 10), (51, 100), (3, 250)])
def test_wilson_interval_matches_scipy(successes, n):
    reference = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((reference.low, reference.high), abs=1e-6)


# --- quality ----------------------------------------------------------------------------------------------------

def test_quality_is_one_minus_repeated_ngrams():
    assert response_quality("one two three four five", n=3) == 1.0
    assert response_quality("the the the the", n=3) == 0.5  # two trigrams, one distinct
    assert response_quality("a b a b a b", n=2) == pytest.approx(2 / 5)
    assert response_quality("I can\u2019t stop, I can\u2019t stop", n=2) == pytest.approx(3 / 5)


def test_short_and_empty_responses_are_degenerate_never_perfect():
    assert response_quality("exactly three words", n=3) == 1.0  # one trigram: judged, not degenerate
    assert response_quality("two words", n=3) is None
    assert response_quality("", n=3) is None
    summary = quality_summary(["", "one two three four", "go go go go go"], n=3)
    assert summary.scores == [0.0, 1.0, pytest.approx(1 / 3)]
    assert summary.mean == pytest.approx((0 + 1 + 1 / 3) / 3)
    assert summary.degenerate_rate == pytest.approx(1 / 3)
    assert summary.ci95[0] <= summary.mean <= summary.ci95[1]


def test_bootstrap_interval_is_seeded_and_tight_on_constants():
    assert bootstrap_interval([0.7] * 20) == pytest.approx((0.7, 0.7))
    values = [float(i % 5) for i in range(50)]
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    low, high = bootstrap_interval(values)
    assert low < 2.0 < high


# --- KL ---------------------------------------------------------------------------------------------------------

def test_kl_divergence_known_value_and_zero_on_itself():
    steered = torch.tensor([[0.5, 0.5]]).log()
    unsteered = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * (torch.tensor(5 / 9).log() + torch.tensor(5.0).log()).item()  # 0.5 ln(.5/.9) + 0.5 ln(.5/.1)
    assert kl_divergence(steered, unsteered) == pytest.approx(expected)
    assert kl_divergence(unsteered, unsteered) == 0.0
    # The other direction weights the log ratio by the unsteered distribution: 0.9 ln(.9/.5) + 0.1 ln(.1/.5).
    reverse = (0.9 * torch.tensor(1.8).log() + 0.1 * torch.tensor(0.2).log()).item()
    assert kl_divergence(steered, unsteered, "unsteered||steered") == pytest.approx(reverse)
    assert kl_divergence(steered, unsteered, "steered||unsteered") == pytest.approx(expected) != pytest.approx(reverse)
    with pytest.raises(ValueError, match="KL direction 'forward' is not one of"):
        kl_divergence(steered, unsteered, "forward")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=21)
    return model, ArchitectureAdapter(model)


def test_next_token_logprobs_are_batch_and_padding_invariant(tiny):
    model, _ = tiny
    prompts = random_prompts(10, seed=22)
    batched = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=10, progress=False)
    alone = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=1, progress=False)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        direct = torch.log_softmax(model(input_ids=torch.tensor([prompts[3]])).logits[0, -1], -1)
    torch.testing.assert_close(alone[3], direct, rtol=1e-5, atol=1e-5)
    assert batched.shape == (10, 64)
    widths: list[tuple[int, int]] = []  # (rows, padded width) of every forward under a token budget
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        budgeted = next_token_logprobs(model, prompts, pad_token_id=0, batch_size=10, max_batch_tokens=48,
                                       progress=False)
    finally:
        handle.remove()
    torch.testing.assert_close(budgeted, alone, rtol=1e-4, atol=1e-4)
    assert sum(rows for rows, _ in widths) == 10 and len(widths) > 1
    assert all(rows * width <= 48 or rows == 1 for rows, width in widths)


def test_kl_is_zero_unsteered_and_positive_under_ablation(tiny):
    model, adapter = tiny
    prompts = random_prompts(6, seed=23)
    base = next_token_logprobs(model, prompts, pad_token_id=0, progress=False)
    delta = torch.randn(adapter.n_layers, adapter.neurons_per_layer, generator=torch.Generator().manual_seed(0))
    circuit = select_circuit(NeuronScores(delta.double(), delta.double(), torch.zeros_like(delta).double()),
                             model="tiny", k=40)
    with NeuronScale(adapter, circuit).steer(0.0):
        assert kl_divergence(next_token_logprobs(model, prompts, pad_token_id=0, progress=False), base) == 0.0
    with NeuronScale(adapter, circuit).steer(1.0):
        assert kl_divergence(next_token_logprobs(model, prompts, pad_token_id=0, progress=False), base) > 1e-6


# --- generation -------------------------------------------------------------------------------------------------

def test_generation_is_the_same_for_batch_size_1_and_16(tiny):
    model, _ = tiny
    prompts = random_prompts(16, seed=24)
    greedy = dict(pad_token_id=0, eos_token_id=[10_000], max_new_tokens=10, progress=False)
    batched = generate(model, prompts, batch_size=16, **greedy)
    assert batched == generate(model, prompts, batch_size=1, **greedy)
    assert all(len(tokens) == 10 for tokens in batched)


def test_generation_stops_at_eos_and_strips_it(tiny):
    model, _ = tiny
    prompts = random_prompts(3, seed=25)
    full = generate(model, prompts, pad_token_id=0, eos_token_id=[10_000], max_new_tokens=6, progress=False)
    stop = full[0][2]
    stopped = generate(model, prompts, pad_token_id=0, eos_token_id=[stop], max_new_tokens=6, progress=False)
    assert stopped[0] == full[0][: full[0].index(stop)]
    assert all(stop not in tokens for tokens in stopped)


# --- MMLU -------------------------------------------------------------------------------------------------------

def question(subject: str, answer: int, text: str = "w10 w11") -> MmluQuestion:
    return MmluQuestion(subject, text, ("w12", "w13", "w14", "w15"), answer)


def test_mmlu_prompt_is_the_standard_format():
    shot = MmluQuestion("high_school_physics", "What is 1+1?", ("1", "2", "3", "4"), 1)
    target = MmluQuestion("high_school_physics", " What is 2+2? ", ("2", "3", "4", "5"), 2)
    assert mmlu_prompt(target, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"
    )


def biased_model(letter_index: int):
    """A tiny model whose LM head always prefers one answer letter: a bias planted in its weights."""
    model = tiny_llama(seed=26)
    tokenizer = tiny_tokenizer()
    bias = torch.zeros(model.config.vocab_size)
    bias[letter_token_ids(tokenizer)[letter_index]] = 50.0
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return model, tokenizer


def test_mmlu_reads_the_planted_answer_bias():
    model, tokenizer = biased_model(letter_index=2)
    questions = [question("a", answer) for answer in [0, 1, 2, 2, 3, 2, 1, 2]]
    result = evaluate_mmlu(model, tokenizer, questions, batch_size=3, progress=False)
    assert result.predictions == [2] * 8
    assert result.accuracy == 0.5 and result.n == 8
    assert result.ci95 == pytest.approx(wilson_interval(4, 8))


def test_mmlu_k_shot_uses_the_subjects_dev_questions():
    model, tokenizer = biased_model(letter_index=0)
    dev = [question("a", 0, "w20"), question("a", 1, "w21"), question("b", 3, "w22")]
    questions = [question("a", 0), question("b", 1)]
    result = evaluate_mmlu(model, tokenizer, questions, dev=dev, k_shot=1, progress=False)
    assert result.per_subject == {"a": 1.0, "b": 0.0} and result.k_shot == 1
    with pytest.raises(Exception, match="k_shot=2 needs 2 dev questions"):
        evaluate_mmlu(model, tokenizer, questions, dev=dev, k_shot=2, progress=False)


def test_stratified_sample_keeps_subject_shares_and_is_seeded():
    questions = [question("big", i % 4, f"w{i}") for i in range(60)]
    questions += [question("small", 0, f"x{i}") for i in range(20)]
    sample = stratified_sample(questions, 8, seed=1)
    assert sum(q.subject == "big" for q in sample) == 6 and sum(q.subject == "small" for q in sample) == 2
    assert sample == stratified_sample(questions, 8, seed=1) != stratified_sample(questions, 8, seed=2)
    with pytest.raises(Exception, match="only 80 questions"):
        stratified_sample(questions, 81)


def test_local_mmlu_files_load(tmp_path):
    (tmp_path / "test").mkdir()
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (tmp_path / "test" / "anatomy_test.csv").write_text(header + '"Q, one",a,b,c,d,3\n')
    loaded = load_mmlu_folder(tmp_path, "test")
    assert loaded == [MmluQuestion("anatomy", "Q, one", ("a", "b", "c", "d"), 3)]


# --- LLM judge --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("planted", "refusal"), [("yes", False), ("no", True)])
def test_llm_judge_plumbing_reads_yes_or_no(planted, refusal):
    model = tiny_llama(seed=27)
    tokenizer = tiny_tokenizer()
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.convert_tokens_to_ids(planted)] = 50.0
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    judge = LLMRefusalJudge(model, tokenizer, batch_size=2)
    assert judge.yes_ids == [tokenizer.convert_tokens_to_ids("yes")]
    verdicts = judge(["w10 w11", "w12", "w13 w14 w15"], ["w20", "w21 w22", ""])
    assert verdicts == [refusal] * 3


def test_responses_become_rates_and_generation_records():
    from cna.evaluation.responses import evaluate_responses

    result = evaluate_responses(["a", "b", "c"], ["I'm sorry, I can't.", "Sure: one two three four.", ""])
    assert (result.refusal.refused, result.refusal.n) == (1, 3)
    assert result.quality.degenerate_rate == pytest.approx(1 / 3)
    assert result.records[0] == {"prompt": "a", "response": "I'm sorry, I can't.", "refused": True, "quality": 1.0}
    assert [r["quality"] for r in result.records] == result.quality.scores
    with pytest.raises(ValueError, match="one response per prompt"):
        evaluate_responses(["a"], [])
