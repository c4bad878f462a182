"""Rewards: a weighted sum of functions, computed so that one bad sample never stops a run.

`REWARDS` maps the built-in names used in `reward.functions` to fn(completion, example, **kwargs)
-> float. A user's own function is named as an entry point or `module:attr` / `file.py:attr`
(rollmill.plugins) and may take one sample that way, or a batch the way TRL calls reward functions:
fn(prompts=[...], completions=[...], answer=[...], <each meta column>=[...], **kwargs) -> list[float].
Either form may be `async def`; samples of an async per-sample function are awaited concurrently.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rollmill.plugins import resolve
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


def reward_keys(cfg: RewardConfig) -> list[str]:
    """Each listed function's key in `per_fn` and `Score.terms`, in order: its name; the same function
    listed again (with other kwargs) gets "#2", "#3", ..."""
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
    keys = reward_keys(cfg)
    n = len(completions)
    per_fn = {key: [0.0] * n for key in keys}
    failed = [False] * n
    errors: list[str] = []
    for key, spec in zip(keys, cfg.functions):
        values, problems = _call(reward_function(spec.name), completions, examples, spec.kwargs)
        per_fn[key] = values
        for i, problem in problems.items():  # a bug or bad input in a reward is that sample's failure only
            failed[i] = True
            errors.append(f"{spec.name}: {problem}")
    total = [
        0.0 if failed[i] else sum(spec.weight * per_fn[key][i] for key, spec in zip(keys, cfg.functions))
        for i in range(n)
    ]
    correct_values = per_fn[cfg.correct_name]
    correct = [not failed[i] and correct_values[i] >= 1.0 for i in range(n)]
    return RewardResult(total=total, correct=correct, failed=failed, per_fn=per_fn, errors=errors)


def reward_function(name: str) -> Callable[..., Any]:
    """The function `name` stands for: built-in, entry point (`rollmill.rewards`) or `module:attr`."""
    return resolve(name, REWARDS, "reward function")


def takes_batch(fn: Callable[..., Any]) -> bool:
    """TRL's form (a `completions` list) rather than rollmill's (completion, example)."""
    return "completions" in inspect.signature(fn).parameters


def batch_columns(examples: list[Example]) -> dict[str, list]:
    """What a batch-form reward gets besides prompts and completions: the reference answer, the
    example id and every column of the examples' meta, one list entry per sample."""
    names = sorted({k for e in examples for k in e.meta})
    return {"answer": [e.answer for e in examples], "example_id": [e.id for e in examples],
            **{k: [e.meta.get(k) for e in examples] for k in names}}


def _call(fn, completions: list[str], examples: list[Example], kwargs: dict) -> tuple[list[float], dict[int, str]]:
    """(value per sample, {sample index: failure}) for one reward function."""
    n = len(completions)
    if takes_batch(fn):
        try:
            values = _batch(fn, completions, examples, kwargs)
            return values, {}
        except Exception as err:
            return [0.0] * n, {i: _describe(err) for i in range(n)}
    if inspect.iscoroutinefunction(fn):
        async def every_sample():
            return await asyncio.gather(*(fn(c, e, **kwargs) for c, e in zip(completions, examples)),
                                        return_exceptions=True)
        outcomes = _run(every_sample())
    else:
        outcomes = []
        for completion, example in zip(completions, examples):
            try:
                outcomes.append(fn(completion, example, **kwargs))
            except Exception as err:
                outcomes.append(err)
    values, problems = [0.0] * n, {}
    for i, outcome in enumerate(outcomes):
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            values[i] = float(outcome)
        except Exception as err:
            problems[i] = _describe(err)
    return values, problems


def _batch(fn, completions: list[str], examples: list[Example], kwargs: dict) -> list[float]:
    params = inspect.signature(fn).parameters
    given = {"prompts": [e.prompt for e in examples], "completions": completions, **batch_columns(examples), **kwargs}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        given = {k: v for k, v in given.items() if k in params}
    out = fn(**given)
    if inspect.isawaitable(out):
        out = _run(out)
    values = [float(v) for v in out]
    if len(values) != len(completions):
        raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
    return values


def _run(awaitable) -> Any:
    """Await from sync code; in a thread of its own when this thread already runs an event loop."""
    async def wait():
        return await awaitable
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@dataclass
class Score:
    """One sample's reward: the weighted total, whether it counts as correct, any failure, and each
    function's raw value by its key (`reward.normalize_each` normalizes these per group)."""

    total: float
    correct: bool
    failed: bool
    error: str | None
    terms: dict[str, float] = field(default_factory=dict)


def score_completion(completion: str, example: Example, cfg: RewardConfig) -> Score:
    """`compute_rewards` for one sample: what a reward worker does for each sample as it finishes."""
    result = compute_rewards([completion], [example], cfg)
    return Score(result.total[0], result.correct[0], result.failed[0], "; ".join(result.errors) or None,
                 {key: values[0] for key, values in result.per_fn.items()})


__all__ = ["REWARDS", "RewardResult", "Score", "compute_rewards", "reward_keys", "score_completion"]
