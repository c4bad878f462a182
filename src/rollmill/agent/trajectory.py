"""What one episode leaves behind for training: token rows with loss masks, turns, rewards, ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable


@dataclass
class Row:
    """One training sequence: `prompt_ids`, then `token_ids` (replies and the observations between them).

    `mask[i]` is 1 exactly on tokens the policy sampled, with `logprobs[i]` as sampled; env text has
    mask 0 and logprob 0. `turn_of_token[i]` is the turn a sampled token belongs to (-1 for env text).
    An episode is one row unless its context policy rewrote the history, which starts a new row.
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_of_token: list[int] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        """What the model continues: the prompt plus everything appended so far."""
        return self.prompt_ids + self.token_ids

    def append(self, ids: list[int], logprobs: list[float] | None = None, turn: int = -1) -> None:
        """Sampled tokens (with their logprobs and turn) or env tokens (without)."""
        sampled = logprobs is not None
        self.token_ids.extend(ids)
        self.mask.extend([int(sampled)] * len(ids))
        self.logprobs.extend(logprobs if sampled else [0.0] * len(ids))
        self.turn_of_token.extend([turn if sampled else -1] * len(ids))


@dataclass
class Turn:
    """One action of the agent and what the env answered."""

    reply: str  # the model's text
    action: str | None  # what the parser extracted; None = unparsable
    observation: str  # the env's answer (empty after the last turn)
    reward: float  # env reward plus any invalid-action penalty
    state: Hashable | None  # env state the action was taken in (GiGPO anchors)
    progress: float | None  # env progress estimate after the action (TurningPoint)
    invalid: bool
    row: int  # which Row holds this turn's tokens
    finish_reason: str  # the engine's: "stop" or "length"


@dataclass
class Trajectory:
    """One episode of one env seed; episodes with the same `group_id` start from the same state."""

    env_name: str
    seed: int
    group_id: int
    rows: list[Row]
    initial_observation: str
    initial_state: Hashable | None = None
    initial_progress: float | None = None
    turns: list[Turn] = field(default_factory=list)
    policy_version: int = 0
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    failed: bool = False  # the env raised or timed out: the episode must not train
    error: str | None = None
    end_reason: str = "running"  # terminated | max_turns | context | env_error | env_timeout | env_truncated
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return sum(t.reward for t in self.turns)

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def invalid_actions(self) -> int:
        return sum(t.invalid for t in self.turns)

    def trained_tokens(self) -> list[int]:
        """Every token with loss mask 1, in order: exactly what the engine sampled."""
        return [t for row in self.rows for t, m in zip(row.token_ids, row.mask) if m]
