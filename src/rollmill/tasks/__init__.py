"""Prompts with reference answers: built-in arithmetic, reasoning-gym datasets, local files, cached hub
datasets, or a user's loader.

`load_task` returns (train, eval) lists of `Example`. Every source keeps the eval split held out
(no eval prompt appears in train) and is deterministic for `TaskConfig.seed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rollmill.config import ConfigError, TaskConfig
from rollmill.plugins import PluginError, resolve


@dataclass(frozen=True)
class Example:
    id: str  # unique within a split, e.g. "larger_of_two/train/17"
    prompt: str  # user message text, instruction already appended
    answer: str  # reference answer as text
    meta: dict = field(default_factory=dict)  # every other column of the data: rewards get it
    messages: tuple | None = None  # a chat prompt ({"role", "content"} dicts, the last the user's), if given as one


class DataError(ConfigError):
    """Task data that cannot be used: a file (the message names the file, the row and the field), or a
    generator or dataset that cannot give what the config asks. A ConfigError, so the CLI prints the
    message alone (exit code 2) like any other config problem."""


def with_instruction(question: str, instruction: str) -> str:
    """`question instruction`, or just `question` when the instruction is empty."""
    return f"{question} {instruction}" if instruction else question


# Imported after Example exists because the source modules build Examples from this package.
from rollmill.tasks.arithmetic import ARITHMETIC_TASKS, load_arithmetic  # noqa: E402


BUILTIN_SOURCES = ("arithmetic", "reasoning_gym", "file", "hub")


def load_task(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) for `cfg`. Deterministic for cfg.seed; no eval prompt appears in train."""
    if cfg.mix:
        return load_mix(cfg)
    if cfg.source == "arithmetic":
        return load_arithmetic(cfg)
    # Imported on demand: `datasets` and `reasoning_gym` take seconds to import.
    if cfg.source == "reasoning_gym":
        from rollmill.tasks.gym import load_reasoning_gym

        return load_reasoning_gym(cfg)
    if cfg.source == "file":
        from rollmill.tasks.files import load_files

        return load_files(cfg)
    if cfg.source == "hub":
        from rollmill.tasks.hub import load_hub

        return load_hub(cfg)
    return load_user_source(cfg)


def load_mix(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """Every source of `cfg.mix`, each example's meta naming its source (`source`: the label), so
    sampling can weight the sources and metrics can be split by them."""
    train: list[Example] = []
    held_out: list[Example] = []
    for item in cfg.mix:
        label = item.mix_label
        item_train, item_eval = load_task(item)
        train += [_labelled(e, label) for e in item_train]
        held_out += [_labelled(e, label) for e in item_eval]
    return train, held_out


def _labelled(example: Example, label: str) -> Example:
    return Example(f"{label}/{example.id}", example.prompt, example.answer, {**example.meta, "source": label},
                   example.messages)


def load_user_source(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """Call the user's loader for `cfg.source`: it returns (train, eval), each a list of `Example`s or
    of dicts with `prompt` and `answer` (every other key goes to `Example.meta`, so rewards see it)."""
    loader = task_source(cfg.source)
    try:
        train, evals = loader(cfg)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"task.source {cfg.source!r} failed: {type(err).__name__}: {err}") from err
    return _examples(train, cfg.source, "train"), _examples(evals, cfg.source, "eval")


def task_source(name: str):
    """The loader a non-built-in `task.source` names (entry point or `module:attr`); PluginError if none."""
    loader = resolve(name, dict.fromkeys(BUILTIN_SOURCES), "task source")  # the built-ins, for the message
    if not callable(loader):
        raise PluginError(f"task.source {name!r} is a {type(loader).__name__}, not a function")
    return loader


def _examples(rows, source: str, split: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Example):
            out.append(row)
            continue
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"task.source {source!r}: {split} row {i} is not an Example or a dict with 'prompt'")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "id")}
        out.append(Example(str(row.get("id", f"{source}/{split}/{i}")), row["prompt"], str(row.get("answer", "")), extra))
    if not out:
        raise DataError(f"task.source {source!r} gave no {split} rows")
    return out


__all__ = ["ARITHMETIC_TASKS", "BUILTIN_SOURCES", "DataError", "Example", "load_task", "task_source", "with_instruction"]
