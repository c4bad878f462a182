"""reasoning-gym procedural datasets as (train, eval) Examples.

The entry travels in `Example.meta` so the `reasoning_gym` reward can call the dataset's own scorer.
"""

from __future__ import annotations

import difflib

import reasoning_gym
from reasoning_gym.factory import DATASETS

from rollmill.config import TaskConfig
from rollmill.tasks import DataError, Example, with_instruction

# reasoning-gym seeds item i with Random(seed + i), so nearby seeds give shifted copies of the same
# items; an offset this large keeps the eval items apart from any realistic train range.
EVAL_SEED_OFFSET = 2**31


def check_dataset_name(name: str) -> None:
    """Raise DataError naming close matches when `name` is not a reasoning-gym dataset."""
    if name in DATASETS:
        return
    close = difflib.get_close_matches(name, DATASETS, n=5)
    examples = close or sorted(DATASETS)[:10]
    raise DataError(
        f"unknown reasoning_gym dataset {name!r}; e.g. {', '.join(examples)} "
        f"({len(DATASETS)} datasets in reasoning_gym.factory.DATASETS)"
    )


def _example(cfg: TaskConfig, split: str, index: int, entry: dict) -> Example:
    return Example(
        id=f"{cfg.name}/{split}/{index}",
        prompt=with_instruction(entry["question"], cfg.instruction_text),
        answer=str(entry["answer"]),
        meta={"rg_dataset": cfg.name, "entry": entry},
    )


def load_reasoning_gym(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) from reasoning-gym dataset `cfg.name`; train skips any question in eval."""
    check_dataset_name(cfg.name)
    eval_data = reasoning_gym.create_dataset(cfg.name, size=cfg.eval_size, seed=cfg.seed + EVAL_SEED_OFFSET)
    evals = [_example(cfg, "eval", i, entry) for i, entry in enumerate(eval_data)]
    held_out = {ex.meta["entry"]["question"] for ex in evals}

    # Most datasets build items on access, so the extra virtual size costs only the items read; it
    # stands in for train items dropped for matching an eval question.
    train_data = reasoning_gym.create_dataset(cfg.name, size=cfg.train_size + cfg.eval_size, seed=cfg.seed)
    trains: list[Example] = []
    for entry in train_data:
        if entry["question"] not in held_out:
            trains.append(_example(cfg, "train", len(trains), entry))
            if len(trains) == cfg.train_size:
                return trains, evals
    raise DataError(
        f"reasoning_gym dataset {cfg.name!r} gave only {len(trains)} train questions outside the "
        f"{cfg.eval_size} eval questions, wanted task.train_size={cfg.train_size}; lower task.eval_size"
    )
