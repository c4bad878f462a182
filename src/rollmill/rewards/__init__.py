"""Rewards: a weighted sum of registered functions, computed so that one bad sample never stops a run.

`REWARDS` maps the names used in `reward.functions` to fn(completion, example, **kwargs) -> float.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollmill.rewards.functions import REWARDS
from rollmill.tasks import Example

if TYPE_CHECKING:  # config.py imports this package while it is still being defined
    from rollmill.config import RewardConfig


@dataclass
class RewardResult:
    total: list[float]  # weighted sum per sample (0.0 for a failed sample)
    correct: list[bool]  # the `cfg.correct_name` function's value >= 1.0 (False if failed)
    failed: list[bool]  # True if any reward function raised for that sample
    per_fn: dict[str, list[float]]  # each function's raw value per sample (0.0 where it raised)
    errors: list[str]  # one line per failure: "fn_name: ExcType: message"


def _keys(cfg: RewardConfig) -> list[str]:
    # The same function may be listed twice with different kwargs; later copies get "#2", "#3", ...
    seen: Counter[str] = Counter()
    keys: list[str] = []
    for fn in cfg.functions:
        seen[fn.name] += 1
        keys.append(fn.name if seen[fn.name] == 1 else f"{fn.name}#{seen[fn.name]}")
    return keys


def compute_rewards(completions: list[str], examples: list[Example], cfg: RewardConfig) -> RewardResult:
    """Score each completion against its example with every function in `cfg`; raising marks it failed."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    keys = _keys(cfg)
    n = len(completions)
    per_fn = {key: [0.0] * n for key in keys}
    failed = [False] * n
    errors: list[str] = []
    for key, spec in zip(keys, cfg.functions):
        fn = REWARDS[spec.name]
        for i, (completion, example) in enumerate(zip(completions, examples)):
            try:
                per_fn[key][i] = float(fn(completion, example, **spec.kwargs))
            except Exception as err:  # any bug or bad input in a reward is that sample's failure only
                failed[i] = True
                message = " ".join(str(err).split())
                errors.append(f"{spec.name}: {type(err).__name__}: {message}")
    total = [
        0.0 if failed[i] else sum(spec.weight * per_fn[key][i] for key, spec in zip(keys, cfg.functions))
        for i in range(n)
    ]
    correct_values = per_fn[cfg.correct_name]
    correct = [not failed[i] and correct_values[i] >= 1.0 for i in range(n)]
    return RewardResult(total=total, correct=correct, failed=failed, per_fn=per_fn, errors=errors)


@dataclass
class Score:
    """One sample's reward: the weighted total, whether it counts as correct, and any failure."""

    total: float
    correct: bool
    failed: bool
    error: str | None


def score_completion(completion: str, example: Example, cfg: RewardConfig) -> Score:
    """`compute_rewards` for one sample: what a reward worker does for each sample as it finishes."""
    result = compute_rewards([completion], [example], cfg)
    return Score(result.total[0], result.correct[0], result.failed[0], "; ".join(result.errors) or None)


__all__ = ["REWARDS", "RewardResult", "Score", "compute_rewards", "score_completion"]
