"""Reward functions on hand-written completions, and compute_rewards' weighting and failure handling."""

from __future__ import annotations

import threading

import pytest

from rollmill.checks import check_config
from rollmill.config import RewardConfig, RewardFn, RunConfig, TaskConfig
from rollmill.rewards import REWARDS, compute_rewards
from rollmill.tasks import Example, load_task


def ex(answer: str, **meta) -> Example:
    return Example(id="t/eval/0", prompt="q", answer=answer, meta=meta)


def test_registry_names_and_help_text():
    assert set(REWARDS) == {
        "first_integer", "last_integer", "exact_match", "math_verify", "format", "answer_tag", "reasoning_gym",
    }
    for fn in REWARDS.values():
        assert fn.__doc__ and "\n" not in fn.__doc__.strip()


@pytest.mark.parametrize(
    "completion, answer, first, last",
    [
        ("The answer is 42.", "42", 1.0, 1.0),
        ("7 apples, then 42", "42", 0.0, 1.0),
        ("42, or maybe 7", "42", 1.0, 0.0),
        ("no number here", "42", 0.0, 0.0),
        ("It is -5 degrees", "-5", 1.0, 1.0),
        ("It is 5 degrees", "-5", 0.0, 0.0),
        ("0042", " 42 ", 1.0, 1.0),
        ("between 3-4", "-4", 0.0, 1.0),
    ],
)
def test_first_and_last_integer(completion, answer, first, last):
    assert REWARDS["first_integer"](completion, ex(answer)) == first
    assert REWARDS["last_integer"](completion, ex(answer)) == last


def test_integer_rewards_reject_a_non_integer_reference():
    with pytest.raises(ValueError, match="not an integer"):
        REWARDS["first_integer"]("3", ex("3.5"))
    with pytest.raises(ValueError, match="not an integer"):
        REWARDS["last_integer"]("3", ex("three"))


def test_exact_match():
    em = REWARDS["exact_match"]
    assert em("  Paris \n", ex("Paris")) == 1.0
    assert em("Paris.", ex("Paris")) == 0.0
    assert em("paris", ex("Paris")) == 0.0
    assert em("paris", ex("Paris"), ignore_case=True) == 1.0


def test_format():
    fmt = REWARDS["format"]
    assert fmt("42", ex("1")) == 1.0
    assert fmt(" -7\n", ex("1")) == 1.0
    assert fmt("42 apples", ex("1")) == 0.0
    assert fmt("", ex("1")) == 0.0
    assert fmt("<think>a\nb</think> 3", ex("1"), pattern=r"<think>.*</think>\s*\d+") == 1.0
    assert fmt("3 <think>a</think>", ex("1"), pattern=r"<think>.*</think>\s*\d+") == 0.0


@pytest.mark.parametrize(
    "completion, value",
    [
        ("<answer>4</answer>", 1.0),
        ("think first\n<answer>\n4\n</answer> done", 1.0),
        ("<answer>4</answer><answer>5</answer>", 0.0),
        ("the answer is 4", 0.0),
        ("</answer>4<answer>", 0.0),
        ("<answer>4", 0.0),
    ],
)
def test_answer_tag(completion, value):
    assert REWARDS["answer_tag"](completion, ex("4")) == value


@pytest.mark.parametrize(
    "completion, answer, value",
    [
        ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
        ("So we get \\boxed{3}", "3", 1.0),
        ("The result is 41", "42", 0.0),
        ("x = -7", "-7", 1.0),
        ("$\\frac{2}{4}$", "\\frac{1}{2}", 1.0),
        ("nothing numeric", "3", 0.0),
    ],
)
def test_math_verify(completion, answer, value):
    assert REWARDS["math_verify"](completion, ex(answer)) == value


def test_math_verify_works_off_the_main_thread():
    # math_verify's default signal.alarm timeout raises ValueError in a worker thread.
    results = []
    worker = threading.Thread(target=lambda: results.append(REWARDS["math_verify"]("so 12", ex("12"))))
    worker.start()
    worker.join()
    assert results == [1.0]


@pytest.fixture(scope="module")
def rg_examples():
    train, _ = load_task(TaskConfig(source="reasoning_gym", name="basic_arithmetic", train_size=3, eval_size=2))
    return train


def test_reasoning_gym_scores_true_answer(rg_examples):
    score = REWARDS["reasoning_gym"]
    for example in rg_examples:
        assert score(example.answer, example) == 1.0
        assert score(f"I computed it.\n<answer> {example.answer} </answer>", example) == 1.0
        assert score(f"<answer>{int(example.answer) + 1}</answer>", example) == 0.0
        # reasoning-gym's default scorer gives partial credit when the reply contains the answer.
        assert 0.0 < score(f"<answer>{example.answer}1</answer>", example) < 1.0
    assert score("<answer>nonsense</answer>", rg_examples[0]) == 0.0


def test_reasoning_gym_needs_an_entry():
    with pytest.raises(ValueError, match="task.source=reasoning_gym"):
        REWARDS["reasoning_gym"]("3", ex("3"))


def cfg(*fns: tuple, correct: str | None = None) -> RewardConfig:
    return RewardConfig(
        functions=[RewardFn(name=name, weight=weight, kwargs=kwargs) for name, weight, kwargs in fns],
        correct=correct,
    )


def test_weighted_sum_and_correct():
    examples = [ex("42"), ex("42"), ex("42")]
    completions = ["42", "The answer is 42", "7"]
    result = compute_rewards(completions, examples, cfg(("first_integer", 2.0, {}), ("format", 0.5, {})))
    assert result.per_fn == {"first_integer": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert result.total == [2.5, 2.0, 0.5]
    assert result.correct == [True, True, False]
    assert result.failed == [False, False, False]
    assert result.errors == []


def test_correct_follows_the_named_function():
    config = cfg(("first_integer", 1.0, {}), ("format", 1.0, {}), correct="format")
    result = compute_rewards(["42 apples", "42"], [ex("42"), ex("42")], config)
    assert result.correct == [False, True]


def test_same_function_twice_keeps_both_values():
    config = cfg(("format", 1.0, {}), ("format", 1.0, {"pattern": r"\d+ apples"}))
    result = compute_rewards(["42 apples"], [ex("42")], config)
    assert result.per_fn == {"format": [0.0], "format#2": [1.0]}
    assert result.total == [1.0]


def test_raising_reward_fails_only_its_sample(monkeypatch):
    def boom(completion: str, example: Example) -> float:
        """Raise on the word 'boom'."""
        if "boom" in completion:
            raise RuntimeError("cannot judge\nthis one")
        return 0.25

    monkeypatch.setitem(REWARDS, "boom", boom)
    examples = [ex("1"), ex("2"), ex("3")]
    result = compute_rewards(["1", "2 boom", "3"], examples, cfg(("first_integer", 1.0, {}), ("boom", 2.0, {})))
    assert result.failed == [False, True, False]
    assert result.total == [1.5, 0.0, 1.5]
    assert result.correct == [True, False, True]
    assert result.per_fn == {"first_integer": [1.0, 1.0, 1.0], "boom": [0.25, 0.0, 0.25]}
    assert result.errors == ["boom: RuntimeError: cannot judge this one"]


def test_bad_kwargs_are_rejected_when_the_config_loads():
    with pytest.raises(ValueError, match=r"takes no argument \['nope'\]; allowed: \['ignore_case'\]"):
        check_config(RunConfig(reward=cfg(("exact_match", 1.0, {"nope": True}))))


def test_length_mismatch_is_a_caller_error():
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        compute_rewards(["1", "2"], [ex("1")], cfg(("first_integer", 1.0, {})))
