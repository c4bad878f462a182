"""A single-turn RLVR task as a one-step env, so task prompts and multi-turn games share one agent loop."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from rollmill.envs.base import register_env
from rollmill.rewards import compute_rewards
from rollmill.tasks import Example, load_task

if TYPE_CHECKING:  # rollmill.config may import the env registry to validate env settings
    from rollmill.config import RewardConfig


class TaskEnv:
    """One prompt per episode (examples[seed % len(examples)]); the single reply is scored by the rewards.

    The reward is the weighted reward total, `success` is the config's correctness function. A reward
    function that raises gives reward 0 with info reward_failed=True and the error text.
    """

    instructions = "Answer the question in the user's message."

    def __init__(self, examples: list[Example], reward_cfg: RewardConfig):
        if not examples:
            raise ValueError("TaskEnv needs at least one example")
        self.examples, self.reward_cfg = examples, reward_cfg
        self.example: Example | None = None

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        index = random.randrange(len(self.examples)) if seed is None else seed % len(self.examples)
        self.example = self.examples[index]
        return self.example.prompt, {"state": self.example.prompt, "progress": 0.0}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.example is None:
            raise RuntimeError("task episode is over; call reset()")
        example, self.example = self.example, None
        result = compute_rewards([action], [example], self.reward_cfg)
        success = result.correct[0]
        info: dict[str, Any] = {
            "state": example.prompt, "success": success, "invalid_action": False, "progress": float(success),
            "reward_failed": result.failed[0],
        }
        if result.failed[0]:
            info["error"] = "; ".join(result.errors)
        return "", result.total[0], True, False, info


@register_env("task", "a single-turn task (built-in arithmetic, reasoning-gym or a file) as a one-step env")
def task(source: str = "arithmetic", name: str = "larger_of_two", path: str | None = None, size: int = 2000,
         seed: int = 0, rewards: tuple[str, ...] = ("first_integer",)) -> TaskEnv:
    """A TaskEnv over the train split of the task, scored by the named reward functions (weight 1 each)."""
    from rollmill.config import RewardConfig, RewardFn, TaskConfig

    if isinstance(rewards, str):  # `rewards: first_integer` in YAML means one function, not its letters
        rewards = (rewards,)
    train, _ = load_task(TaskConfig(source=source, name=name, path=path, train_size=size, seed=seed))
    return TaskEnv(train, RewardConfig(functions=[RewardFn(name=n) for n in rewards]))
