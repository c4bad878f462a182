"""Reward functions: fn(completion, example, **kwargs) -> float, usually 1.0 for a hit and 0.0 else.

A function may raise on input it cannot judge (say, a non-integer reference for `first_integer`);
`compute_rewards` turns that into a failed sample instead of stopping the run.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Callable

from rollmill.tasks import Example

INTEGER = re.compile(r"-?\d+")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _reference_int(example: Example) -> int:
    try:
        return int(example.answer.strip())
    except ValueError:
        raise ValueError(f"reference answer {example.answer!r} of {example.id} is not an integer") from None


def first_integer(completion: str, example: Example) -> float:
    """1.0 if the first integer in the completion equals the reference answer."""
    match = INTEGER.search(completion)
    return float(match is not None and int(match.group()) == _reference_int(example))


def last_integer(completion: str, example: Example) -> float:
    """1.0 if the last integer in the completion equals the reference answer."""
    found = INTEGER.findall(completion)
    return float(bool(found) and int(found[-1]) == _reference_int(example))


def exact_match(completion: str, example: Example, ignore_case: bool = False) -> float:
    """1.0 if the stripped completion equals the stripped reference answer."""
    got, want = completion.strip(), example.answer.strip()
    if ignore_case:
        got, want = got.casefold(), want.casefold()
    return float(got == want)


def format_reward(completion: str, example: Example, pattern: str = r"\s*-?\d+\s*") -> float:
    """1.0 if the whole completion matches `pattern` (default: just a number)."""
    return float(re.fullmatch(pattern, completion, re.DOTALL) is not None)


def answer_tag(completion: str, example: Example) -> float:
    """1.0 if the completion holds exactly one <answer>...</answer> block."""
    opened, closed = completion.count("<answer>"), completion.count("</answer>")
    return float(opened == 1 and closed == 1 and completion.index("<answer>") < completion.index("</answer>"))


def math_verify(completion: str, example: Example, timeout: int = 5) -> float:
    """1.0 if math_verify finds the completion's answer equal to the reference."""
    from math_verify import parse, verify

    # math_verify times out with signal.alarm, which raises ValueError outside the main thread;
    # there the checks run without a timeout instead.
    limit = timeout if threading.current_thread() is threading.main_thread() else None
    answer = example.answer.strip()
    # A bare "1/2" or "\frac{1}{2}" only parses as LaTeX when delimited.
    if "$" not in answer and "\\boxed" not in answer:
        answer = f"${answer}$"
    gold = parse(answer, parsing_timeout=limit)
    if not gold:
        raise ValueError(f"math_verify cannot parse the reference answer {example.answer!r} of {example.id}")
    target = parse(completion, parsing_timeout=limit)
    return float(verify(gold, target, timeout_seconds=limit))


@lru_cache(maxsize=None)
def _rg_scorer(name: str) -> Callable[..., float]:
    import reasoning_gym

    # score_answer reads the entry, not the generated items, so one tiny instance serves every sample.
    return reasoning_gym.create_dataset(name, size=1, seed=0).score_answer


def reasoning_gym_score(completion: str, example: Example) -> float:
    """The reasoning-gym dataset's own score for the last <answer> block (or the whole reply)."""
    if "rg_dataset" not in example.meta:
        raise ValueError(f"{example.id} carries no reasoning-gym entry; this reward needs task.source=reasoning_gym")
    tagged = ANSWER_TAG.findall(completion)
    extracted = tagged[-1].strip() if tagged else completion.strip()
    scorer = _rg_scorer(example.meta["rg_dataset"])
    return float(scorer(answer=extracted, entry=example.meta["entry"]))


REWARDS: dict[str, Callable[..., float]] = {
    "first_integer": first_integer,
    "last_integer": last_integer,
    "exact_match": exact_match,
    "math_verify": math_verify,
    "format": format_reward,
    "answer_tag": answer_tag,
    "reasoning_gym": reasoning_gym_score,
}
