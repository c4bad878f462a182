"""Prompts with reference answers: built-in arithmetic, reasoning-gym datasets, or local files.

`load_task` returns (train, eval) lists of `Example`. Every source keeps the eval split held out
(no eval prompt appears in train) and is deterministic for `TaskConfig.seed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rollmill.config import ConfigError, TaskConfig


@dataclass(frozen=True)
class Example:
    id: str  # unique within a split, e.g. "larger_of_two/train/17"
    prompt: str  # user message text, instruction already appended
    answer: str  # reference answer as text
    meta: dict = field(default_factory=dict)


class DataError(ConfigError):
    """Task data that cannot be used: a file (the message names the file, the row and the field), or a
    generator or dataset that cannot give what the config asks. A ConfigError, so the CLI prints the
    message alone (exit code 2) like any other config problem."""


def with_instruction(question: str, instruction: str) -> str:
    """`question instruction`, or just `question` when the instruction is empty."""
    return f"{question} {instruction}" if instruction else question


# Imported after Example exists because the source modules build Examples from this package.
from rollmill.tasks.arithmetic import ARITHMETIC_TASKS, load_arithmetic  # noqa: E402


def load_task(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) for `cfg`. Deterministic for cfg.seed; no eval prompt appears in train."""
    if cfg.source == "arithmetic":
        return load_arithmetic(cfg)
    # Imported on demand: `datasets` and `reasoning_gym` take seconds to import.
    if cfg.source == "reasoning_gym":
        from rollmill.tasks.gym import load_reasoning_gym

        return load_reasoning_gym(cfg)
    from rollmill.tasks.files import load_files

    return load_files(cfg)


__all__ = ["ARITHMETIC_TASKS", "DataError", "Example", "load_task", "with_instruction"]
