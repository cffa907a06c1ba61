"""Behaviour of idistill_core.training.evaluate: answer parsing, SQuAD scoring, likelihood scoring, generation."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch

from idistill_core.data.chat import render_chat
from idistill_core.errors import ConfigError, DataError
from idistill_core.models.loading import load_model
from idistill_core.training.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate,
    extract_number,
    generate_greedy,
    item_scores,
    normalize_number,
    normalize_squad,
    paired_gap,
    paired_interval,
    squad_em,
    squad_f1,
    stop_token_ids,
)


@functools.cache
def _tiny(dtype: torch.dtype):
    return load_model("tiny-llama", dtype=dtype, seed=3)


def tiny(dtype: torch.dtype = torch.float64):
    loaded = _tiny(dtype)
    return loaded.model, loaded.tokenizer


def row(sample_id: str, question: str, reference: str, **fields) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reference}]
    return {"sample_id": sample_id, "source": "t", "messages": messages, **fields}


QUESTIONS = [
    "What is 2 + 2?",
    "Tom has 3 apples and buys 5 more. How many now?",
    "Hi",
    "Name a red fruit.",
    "A train travels 120 miles in 2 hours. What is its speed in miles per hour?",
]


def prompt_ids(tokenizer, question: str) -> list[int]:
    text = render_chat([{"role": "user", "content": question}], tokenizer, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_logprob_sum(model, prompt: list[int], continuation: list[int]) -> tuple[float, int]:
    """Independent reference: one unpadded forward, log-softmax, sum over the continuation tokens."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(continuation)), len(continuation)


# --- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 42", "42"),
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("The answer is 42", "42"),
        ("The answer is 42. Then 7 more things.", "42"),
        ("Step 1 gives 5. The answer is: $1,234.", "1234"),
        ("42.", "42"),
        ("$1,234", "1234"),
        ("-3", "-3"),
        ("It is 3.50 dollars", "3.5"),
        ("2.0", "2"),
        ("-0", "0"),
        ("100", "100"),
        ("He has 3 + 5 = 8 apples", "8"),
        ("1,234,567 people", "1234567"),
        ("no number here", None),
    ],
)
def test_extract_number_handles_common_answer_formats(text, expected):
    assert extract_number(text) == expected


def test_marked_answer_wins_over_later_numbers_and_fallback_can_be_disabled():
    assert extract_number("The answer is 6. Also 9 and 10.") == "6"
    assert extract_number("so 3 + 5 = 8 apples", fallback=False) is None


@pytest.mark.parametrize(
    "text, expected",
    [("1,450,000", "1450000"), ("$18", "18"), ("7.50", "7.5"), ("3.0", "3"), ("12.", "12"), ("abc", None)],
)
def test_normalize_number_gives_one_canonical_spelling(text, expected):
    assert normalize_number(text) == expected


def test_squad_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_squad("  The Eiffel-Tower,  in   an instant! ") == "eiffeltower in instant"
    assert squad_em("The Eiffel Tower.", "eiffel tower") == 1.0
    assert squad_em("Eiffel", "eiffel tower") == 0.0


def test_squad_f1_matches_hand_computed_overlap():
    # "big cat" vs "big dog": 1 common token, P = R = 1/2.
    assert squad_f1("The Big cat!", "a big dog") == pytest.approx(0.5)
    # "paris france" vs "paris": P = 1/2, R = 1 -> F1 = 2/3.
    assert squad_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # Repeated tokens count with multiplicity: "a a b" -> ["b"]... use non-articles: "x x y" vs "x y y".
    # common = min(2,1) + min(1,2) = 2, P = R = 2/3.
    assert squad_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert squad_f1("the", "a") == 1.0  # both normalise to empty: the official script scores this 1
    assert squad_f1("", "paris") == 0.0


# --- scripted generation (exact control over what the model says) ------------------------------------


class Scripted:
    """Makes ``model`` say ``text`` (then ``<|im_end|>``, then ``tail``) whatever the prompt.

    A forward hook on ``lm_head`` replaces the logits of the last position with a one-hot on the next
    scripted token; it counts its calls so a test can see generation stop.
    """

    def __init__(self, model, tokenizer, text: str, tail: str = " 99 99 99"):
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.script = tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
        self.script += tokenizer(tail, add_special_tokens=False)["input_ids"]
        self.calls = 0
        self.handle = model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.full_like(output, -1e4)
        logits[:, -1, token] = 0.0
        return logits

    def remove(self):
        self.handle.remove()


def test_generation_stops_at_end_of_turn_and_em_number_scores_the_answer():
    model, tokenizer = tiny()
    rows = [
        row("a", QUESTIONS[0], "The answer is 42.", answer="42"),
        row("b", QUESTIONS[1], "The answer is 8.", answer="8"),
        row("c", QUESTIONS[2], "The answer is 42.", answer="42.0"),
    ]
    said = "7 * 6 = 42. The answer is 42."
    scripted = Scripted(model, tokenizer, said)
    # Like a checkpoint whose generation config does not name the end-of-turn token: evaluate must find it.
    saved_eos = model.generation_config.eos_token_id, model.config.eos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    try:
        result = evaluate(
            model, tokenizer, rows, "em-number", EvalConfig(max_new_tokens=64, answer_nll=False)
        )
    finally:
        scripted.remove()
        model.generation_config.eos_token_id, model.config.eos_token_id = saved_eos
    # One call per scripted token plus the one that emits <|im_end|>; then every row has stopped.
    assert scripted.calls == len(tokenizer(said, add_special_tokens=False)["input_ids"]) + 1
    assert [p["prediction"] for p in result.predictions] == [said] * 3
    assert [p["correct"] for p in result.predictions] == [True, False, True]
    assert result.score == pytest.approx(2 / 3) and result.n == 3
    assert result.details["em_marked"] == pytest.approx(2 / 3)
    assert [p["sample_id"] for p in result.predictions] == ["a", "b", "c"]


def test_squad_metric_takes_first_line_and_the_best_gold_answer():
    model, tokenizer = tiny()
    rows = [
        row("q1", QUESTIONS[3], "Paris", answers=["Paris", "the city of Paris"]),
        row("q2", QUESTIONS[0], "Paris, France", answers=["Paris, France"]),
    ]
    scripted = Scripted(model, tokenizer, "Paris, France\nIt is a city.")
    try:
        result = evaluate(model, tokenizer, rows, "squad", EvalConfig(answer_nll=False))
    finally:
        scripted.remove()
    assert [p["prediction"] for p in result.predictions] == ["Paris, France"] * 2
    # q1: F1 vs "paris" = 2/3, vs "city of paris" = 2*(1/2*1/3)/(1/2+1/3) = 0.4 -> 2/3; EM 0. q2: exact.
    assert result.predictions[0]["score"] == pytest.approx(2 / 3)
    assert result.details["em"] == pytest.approx(0.5)
    assert result.details["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert result.score == result.details["f1"]


# --- real (tiny) model numbers against independent computations ---------------------------------------


def greedy_loop(model, prompt: list[int], max_new: int, stops: list[int]) -> list[int]:
    """Independent reference: unbatched, no KV cache, argmax of a full forward per new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
            ids.append(token)
    return out


def test_batched_left_padded_generation_matches_unbatched_greedy_loop():
    model, tokenizer = tiny()
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so left padding is exercised
    config = EvalConfig(max_new_tokens=12, batch_size=4)
    batched = generate_greedy(model, tokenizer, prompts, config)
    stops = stop_token_ids(tokenizer, model)
    expected = [tokenizer.decode(greedy_loop(model, p, 12, stops), skip_special_tokens=True) for p in prompts]
    assert batched == expected
    assert any(text for text in batched)


def test_mc_picks_the_choice_with_the_highest_independent_loglikelihood():
    model, tokenizer = tiny()
    choices = ["shark", "dolphin", "trout", "octopus"]
    rows, best = [], []
    for i, question in enumerate(QUESTIONS):
        prompt = prompt_ids(tokenizer, question)
        scores = [
            plain_logprob_sum(
                model, prompt, tokenizer(f"The answer is {x}.", add_special_tokens=False)["input_ids"]
            )[0]
            for x in "ABCD"
        ]
        best.append("ABCD"[max(range(4), key=scores.__getitem__)])
        # Rows 0, 2, 4 name the model's favourite as correct, rows 1, 3 another letter.
        answer = best[-1] if i % 2 == 0 else "ABCD"[("ABCD".index(best[-1]) + 1) % 4]
        rows.append(row(f"m{i}", question, f"The answer is {answer}.", choices=choices, answer=answer))
        rows[-1]["expected_scores"] = scores
    result = evaluate(model, tokenizer, rows, "mc", EvalConfig(batch_size=3))
    assert [p["prediction"] for p in result.predictions] == best
    assert result.score == pytest.approx(3 / 5)
    for pred, r in zip(result.predictions, rows):
        got = [pred["choice_logprobs"][x] for x in "ABCD"]
        assert got == pytest.approx(r["expected_scores"], rel=1e-6, abs=1e-6)
    assert "answer_nll" in result.details
    picks, answers = Counter(best), Counter(r["answer"] for r in rows)
    assert result.details["top_pick_share"] == max(picks.values()) / 5
    assert result.details["majority_letter_accuracy"] == max(answers.values()) / 5
    assert item_scores(result).tolist() == [float(b == r["answer"]) for b, r in zip(best, rows)]
    scores = np.array([r["expected_scores"] for r in rows])
    calibrated = np.argmax(scores - scores.mean(axis=0), axis=1)  # letter columns centred over the rows
    expected = np.mean(["ABCD"[c] == r["answer"] for c, r in zip(calibrated, rows)])
    assert result.details["letter_calibrated_accuracy"] == pytest.approx(expected)


def test_paired_interval_matches_the_normal_approximation_and_is_degenerate_for_a_constant_gap():
    rng = np.random.default_rng(7)
    diff = rng.choice([-1.0, 0.0, 1.0], size=900, p=[0.2, 0.5, 0.3])
    low, high = paired_interval(diff)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)  # independent: the CLT interval
    assert (low + high) / 2 == pytest.approx(diff.mean(), abs=0.01)
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert paired_interval(np.full(50, 0.25)) == (0.25, 0.25)
    assert paired_interval(diff, seed=1) != (low, high)  # the resampling really is random
    with pytest.raises(DataError, match="no rows"):
        paired_interval(np.array([]))


def test_paired_gap_is_the_first_results_rows_minus_the_seconds_and_refuses_other_rows():
    def result(correct):
        return EvalResult("mc", 0.0, len(correct), predictions=[
            {"sample_id": f"t{i}", "correct": c} for i, c in enumerate(correct)])

    better, worse = result([True] * 30 + [False] * 10), result([True] * 10 + [False] * 30)
    gap = paired_gap(better, worse)
    assert gap["mean"] == pytest.approx(0.5)  # 20 of 40 rows right only in the first
    assert (gap["ci95_low"], gap["ci95_high"]) == paired_interval(np.array([0.0] * 10 + [1.0] * 20 + [0.0] * 10))
    assert gap["ci95_low"] > 0 and not gap["within_noise"]
    assert paired_gap(worse, better)["mean"] == pytest.approx(-0.5)
    assert paired_gap(better, better)["within_noise"]
    with pytest.raises(DataError, match="same test rows"):
        paired_gap(better, result([True] * 39))


def test_nll_is_the_token_pooled_teacher_forced_loss_of_the_reference():
    model, tokenizer = tiny()
    references = ["The answer is 4.", "He has 3 + 5 = 8 apples now, so the answer is 8.", "Hello!"]
    rows = [row(f"n{i}", q, r) for i, (q, r) in enumerate(zip(QUESTIONS, references))]
    total, count = 0.0, 0
    per_row = []
    for q, r in zip(QUESTIONS, references):
        s, n = plain_logprob_sum(
            model, prompt_ids(tokenizer, q), tokenizer(r, add_special_tokens=False)["input_ids"]
        )
        total, count = total - s, count + n
        per_row.append(-s / n)
    result = evaluate(model, tokenizer, rows, "nll", EvalConfig(batch_size=2))
    assert result.score == pytest.approx(total / count, rel=1e-6)
    assert [p["score"] for p in result.predictions] == pytest.approx(per_row, rel=1e-6)
    assert result.details["tokens"] == count


def test_over_long_prompts_keep_their_end():
    model, tokenizer = tiny()
    reference = "The answer is 4."
    rows = [row("long", " ".join(["filler"] * 40) + " What is 2 + 2?", reference)]
    prompt = prompt_ids(tokenizer, rows[0]["messages"][0]["content"])
    cont = tokenizer(reference, add_special_tokens=False)["input_ids"]
    max_length = len(cont) + 10
    s, n = plain_logprob_sum(model, prompt[-10:], cont)
    result = evaluate(model, tokenizer, rows, "nll", EvalConfig(max_length=max_length))
    assert result.score == pytest.approx(-s / n, rel=1e-6)
    assert result.details["num_truncated_prompts"] == 1


def test_evaluate_restores_training_mode():
    model, tokenizer = tiny()
    model.train()
    try:
        evaluate(model, tokenizer, [row("x", "Hi", "Hello")], "nll")
        assert model.training
    finally:
        model.eval()


# --- bad input -----------------------------------------------------------------------------------------


def test_rows_missing_what_their_metric_needs_are_rejected_by_sample_id():
    model, tokenizer = tiny(torch.float32)
    with pytest.raises(DataError, match="'r2'.*'answer'"):
        evaluate(model, tokenizer, [row("r1", "q", "a", answer="1"), row("r2", "q", "a")], "em-number")
    with pytest.raises(DataError, match="'r1'.*'answers'"):
        evaluate(model, tokenizer, [row("r1", "q", "a")], "squad")
    with pytest.raises(DataError, match="'r1'.*'E'"):
        evaluate(model, tokenizer, [row("r1", "q", "a", choices=["x", "y"], answer="E")], "mc")
    user_last = {"sample_id": "u1", "messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(DataError, match="'u1'"):
        evaluate(model, tokenizer, [user_last], "nll")
    with pytest.raises(DataError, match="no rows"):
        evaluate(model, tokenizer, [], "nll")
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(model, tokenizer, [row("r1", "q", "a")], "bleu")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 1}, "max_length"),
        ({"mc_template": "Answer"}, "mc_template"),
    ],
)
def test_bad_eval_config_fields_are_rejected_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EvalConfig(**kwargs)


def test_lm_eval_harness_and_our_metric_give_the_same_exact_match(tmp_path):
    """The harness really runs (HFLM over the in-memory model, a generated task YAML over a local file, its
    regex filter and exact_match); a tiny model fine-tuned to answer four questions, scored on those four with
    the right gold and the same four with a wrong gold, gets 0.5 from both."""
    import datasets

    from idistill_core.data.chat import tokenize_rows
    from idistill_core.models.loading import load_model
    from idistill_core.training.evaluate import evaluate_lm_eval
    from idistill_core.training.finetune import FinetuneConfig, finetune

    loaded = load_model("tiny-llama", seed=0)
    qa = [("Tom has 3 apples and buys 5 more. How many apples?", 8), ("Sara had 24 cookies and ate 9.", 15),
          ("A box holds 6 eggs. How many eggs in 2 boxes?", 12), ("Lena has 7 pens and loses 2.", 5)]

    def row(i, q, a, gold):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}]
        return {"sample_id": f"r{i}", "source": "arith", "messages": messages, "answer": str(gold)}

    train_rows = [row(i, q, a, a) for i, (q, a) in enumerate(qa)]
    examples = tokenize_rows(datasets.Dataset.from_list(train_rows), loaded.tokenizer, 128).examples
    finetune(loaded.model, loaded.tokenizer, examples, FinetuneConfig(lr=1e-2, max_steps=60, batch_size=4,
                                                                      precision="fp32"))
    test_rows = train_rows + [row(4 + i, q, a, a + 1) for i, (q, a) in enumerate(qa)]
    config = EvalConfig(max_new_tokens=16, batch_size=8)
    ours = evaluate(loaded.model, loaded.tokenizer, test_rows, "em-number", config)
    harness = evaluate_lm_eval(loaded.model, loaded.tokenizer, test_rows, "gsm8k-local", config)
    assert ours.score == 0.5, [p["prediction"] for p in ours.predictions]
    assert harness["results"]["exact_match,flexible-extract"] == ours.score
    assert harness["lm_eval_version"].startswith("0.4")
    assert harness["task_config"]["output_type"] == "generate_until"
