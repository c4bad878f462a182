"""Built-in arithmetic tasks: tiny questions a small model can learn within a few RL steps.

Each generator maps a `random.Random` to (question, answer). Eval questions are drawn first with
their own RNG and are distinct; train is then drawn (repeats allowed) from everything else.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from rollmill.config import TaskConfig
from rollmill.tasks import DataError, Example, with_instruction

Generator = Callable[[random.Random], tuple[str, str]]


def larger_of_two(rng: random.Random) -> tuple[str, str]:
    """Pick the larger of two distinct 2-digit numbers."""
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def add_1digit(rng: random.Random) -> tuple[str, str]:
    """Add two 1-digit numbers."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", str(a + b)


def add_2digit(rng: random.Random) -> tuple[str, str]:
    """Add two 2-digit numbers."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def double(rng: random.Random) -> tuple[str, str]:
    """Double a number from 1 to 50."""
    n = rng.randint(1, 50)
    return f"What is {n} doubled?", str(2 * n)


def teen_minus_digit(rng: random.Random) -> tuple[str, str]:
    """Subtract a digit from a number between 11 and 19."""
    a, b = rng.randint(11, 19), rng.randint(1, 9)
    return f"What is {a} - {b}?", str(a - b)


def sequence_next(rng: random.Random) -> tuple[str, str]:
    """Continue a short increasing arithmetic sequence by one term."""
    start, step, length = rng.randint(1, 20), rng.randint(1, 9), rng.randint(3, 5)
    terms = ", ".join(str(start + i * step) for i in range(length))
    return f"What is the next number in the sequence {terms}?", str(start + length * step)


ARITHMETIC_TASKS: dict[str, Generator] = {
    fn.__name__: fn for fn in (larger_of_two, add_1digit, add_2digit, double, teen_minus_digit, sequence_next)
}

# Distinct questions each generator can produce, counted from its ranges (tests/test_tasks.py checks
# them by sampling). The eval split must leave some for train: asking for more would only end when
# the draw budget runs out, which for a large task.eval_size takes minutes.
QUESTION_COUNTS: dict[str, int] = {
    "larger_of_two": 90 * 89,  # ordered pairs of distinct 2-digit numbers
    "add_1digit": 10 * 10,
    "add_2digit": 90 * 90,
    "double": 50,
    "teen_minus_digit": 9 * 9,
    "sequence_next": 20 * 9 * 3,  # start x step x length
}


def arithmetic_problems(cfg: TaskConfig) -> Iterator[tuple[str, object, str]]:
    """(key, value, message) for each reason `cfg` cannot be drawn: an unknown generator name, or an
    eval split that leaves no question for train. Checked before drawing, so neither spins."""
    if cfg.name not in ARITHMETIC_TASKS:
        yield "task.name", cfg.name, f"unknown arithmetic task {cfg.name!r}; allowed: {sorted(ARITHMETIC_TASKS)}"
        return
    count = QUESTION_COUNTS[cfg.name]
    if cfg.eval_size >= count:
        yield "task.eval_size", cfg.eval_size, (
            f"arithmetic task {cfg.name!r} has too few distinct questions: it can generate {count}, and "
            f"task.eval_size={cfg.eval_size} distinct ones held out for eval leave no train questions outside "
            f"the eval split (task.train_size={cfg.train_size}); set task.eval_size to at most {count - 1}")


def _budget(n: int) -> int:
    # Rejection sampling needs a cap: a question space smaller than the request would loop forever.
    return 100 * n + 10_000


def _too_small(cfg: TaskConfig, found: int, wanted: str) -> DataError:
    return DataError(
        f"arithmetic task {cfg.name!r} has too few distinct questions: found only {found} {wanted} "
        f"(task.eval_size={cfg.eval_size} distinct eval questions are held out, then "
        f"task.train_size={cfg.train_size} train questions must come from the rest); lower task.eval_size"
    )


def _draw_eval(gen: Generator, rng: random.Random, cfg: TaskConfig) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for _ in range(_budget(cfg.eval_size)):
        question, answer = gen(rng)
        found.setdefault(question, answer)
        if len(found) == cfg.eval_size:
            return list(found.items())
    raise _too_small(cfg, len(found), f"distinct questions for {cfg.eval_size} eval examples")


def _draw_train(gen: Generator, rng: random.Random, cfg: TaskConfig, held_out: set[str]) -> list[tuple[str, str]]:
    drawn: list[tuple[str, str]] = []
    for _ in range(_budget(cfg.train_size)):
        question, answer = gen(rng)
        if question not in held_out:
            drawn.append((question, answer))
            if len(drawn) == cfg.train_size:
                return drawn
    raise _too_small(cfg, len(drawn), f"train questions outside the eval split, wanted {cfg.train_size}")


def load_arithmetic(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) from the generator named `cfg.name`."""
    problem = next(arithmetic_problems(cfg), None)
    if problem is not None:
        raise DataError(problem[2])
    gen = ARITHMETIC_TASKS[cfg.name]
    # String seeds hash deterministically (unlike tuples), and separate streams keep eval fixed
    # when only train_size changes.
    evals = _draw_eval(gen, random.Random(f"{cfg.seed}/eval"), cfg)
    trains = _draw_train(gen, random.Random(f"{cfg.seed}/train"), cfg, {q for q, _ in evals})

    def examples(split: str, pairs: list[tuple[str, str]]) -> list[Example]:
        return [
            Example(id=f"{cfg.name}/{split}/{i}", prompt=with_instruction(q, cfg.instruction_text), answer=a)
            for i, (q, a) in enumerate(pairs)
        ]

    return examples("train", trains), examples("eval", evals)
