"""Built-in arithmetic tasks: tiny questions a small model can learn within a few RL steps.

Each generator maps a `random.Random` to (question, answer). Eval questions are drawn first with
their own RNG and are distinct; train is then drawn (repeats allowed) from everything else.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from rollmill.tasks import Example, with_instruction

if TYPE_CHECKING:  # config.py imports this package while it is still being defined
    from rollmill.config import TaskConfig

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


def _budget(n: int) -> int:
    # Rejection sampling needs a cap: a question space smaller than the request would loop forever.
    return 100 * n + 10_000


def _too_small(cfg: TaskConfig, found: int, wanted: str) -> ValueError:
    return ValueError(
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
    gen = ARITHMETIC_TASKS.get(cfg.name)
    if gen is None:
        raise ValueError(f"unknown arithmetic task {cfg.name!r}; allowed: {sorted(ARITHMETIC_TASKS)}")
    # String seeds hash deterministically (unlike tuples), and separate streams keep eval fixed
    # when only train_size changes.
    evals = _draw_eval(gen, random.Random(f"{cfg.seed}/eval"), cfg)
    trains = _draw_train(gen, random.Random(f"{cfg.seed}/train"), cfg, {q for q, _ in evals})

    def examples(split: str, pairs: list[tuple[str, str]]) -> list[Example]:
        return [
            Example(id=f"{cfg.name}/{split}/{i}", prompt=with_instruction(q, cfg.instruction), answer=a)
            for i, (q, a) in enumerate(pairs)
        ]

    return examples("train", trains), examples("eval", evals)
