"""The one data model for what was sampled: trajectories of turns, with the token rows training reads.

An RLVR sample is a one-turn trajectory (one row: the prompt, then the completion). An agentic episode
is a trajectory of many turns, usually one row (replies and env text appended as they happen). The
model proxy's calls become a trajectory with one row per call. Every generated token carries the
behaviour log-prob it was sampled with and the policy version that sampled it, so a trajectory that
spans a weight update (a partial rollout) says exactly which tokens came from which weights.

This module imports nothing from rollmill: every layer can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

ENV_TOKEN = -1  # the version and turn of tokens the policy did not sample (prompt glue, observations)


@dataclass
class Row:
    """One training sequence: `prompt_ids`, then `token_ids` (replies and the env text between them).

    `mask[i]` is 1 exactly on tokens the policy sampled, with `logprobs[i]` as sampled, `versions[i]`
    the policy version that sampled it and `turn_of_token[i]` the turn it belongs to; env text has
    mask 0, logprob 0, version and turn `ENV_TOKEN`. An episode is one row unless its context policy
    rewrote the history, which starts a new row.
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_of_token: list[int] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        """What the model continues: the prompt plus everything appended so far."""
        return self.prompt_ids + self.token_ids

    def append_sampled(self, ids: list[int], logprobs: list[float], versions: list[int], turn: int) -> None:
        """Tokens the policy sampled, each with its log-prob and the version that sampled it."""
        if not len(ids) == len(logprobs) == len(versions):
            raise ValueError(f"{len(ids)} tokens, {len(logprobs)} log-probs and {len(versions)} versions")
        self.token_ids.extend(ids)
        self.mask.extend([1] * len(ids))
        self.logprobs.extend(logprobs)
        self.versions.extend(versions)
        self.turn_of_token.extend([turn] * len(ids))

    def append_env(self, ids: list[int]) -> None:
        """Tokens the policy did not sample (template glue, observations): never trained."""
        self.token_ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))
        self.versions.extend([ENV_TOKEN] * len(ids))
        self.turn_of_token.extend([ENV_TOKEN] * len(ids))

    @classmethod
    def sampled(cls, prompt_ids: list[int], token_ids: list[int], logprobs: list[float], version: int = 0) -> Row:
        """A row whose continuation was sampled whole by one policy version (an RLVR completion)."""
        row = cls(list(prompt_ids))
        row.append_sampled(list(token_ids), list(logprobs), [version] * len(token_ids), turn=0)
        return row


@dataclass
class Turn:
    """One reply of the policy and what came back: the env's answer, or the verifier's score."""

    reply: str  # the model's text
    action: str | None  # what the parser extracted; None = unparsable (RLVR: the reply itself)
    observation: str  # the env's answer (empty after the last turn, and for RLVR)
    reward: float  # env reward plus any invalid-action penalty (RLVR: the verifier's total, shaped)
    state: Hashable | None  # env state the action was taken in (GiGPO anchors)
    progress: float | None  # env progress estimate after the action (TurningPoint)
    invalid: bool
    row: int  # which Row holds this turn's tokens
    finish_reason: str  # the engine's: "stop" or "length"


@dataclass
class Trajectory:
    """One sample: an episode of an env seed, or a completion of a prompt; samples with the same
    `group_id` start from the same state (the same prompt, or the same env seed).

    `index` numbers the samples of a group (0..G-1, more with redundant rollouts). `prompt_id` says
    what the group was started from: the example's position in the training split (RLVR) or the env
    seed (agentic).
    """

    group_id: int
    index: int
    prompt_id: int
    rows: list[Row] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    initial_observation: str = ""  # the prompt text, or the env's first observation
    initial_state: Hashable | None = None
    initial_progress: float | None = None
    success: bool = False  # the task was solved (RLVR: the `reward.correct` function scored >= 1)
    failed: bool = False  # the env or the reward raised or timed out: the sample must not train as is
    error: str | None = None
    # terminated | env_truncated | max_turns | context | env_error | env_timeout (agentic);
    # stop | length (RLVR: how the completion ended)
    end_reason: str = "running"
    info: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0  # the run of its group it came from (`GroupSpec.attempt`): a late sample of a stopped run is not counted

    @property
    def reward(self) -> float:
        return sum(t.reward for t in self.turns)

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def invalid_actions(self) -> int:
        return sum(t.invalid for t in self.turns)

    @property
    def versions(self) -> list[int]:
        """The policy version of every sampled token, in order."""
        return [v for row in self.rows for v, m in zip(row.versions, row.mask) if m]

    @property
    def oldest_version(self) -> int | None:
        """The version of its oldest sampled token (what the staleness bound looks at); None if it has none."""
        return min(self.versions, default=None)

    @property
    def sampled_tokens(self) -> int:
        return sum(sum(row.mask) for row in self.rows)

    def trained_tokens(self) -> list[int]:
        """Every token with loss mask 1, in order: exactly what the engine sampled."""
        return [t for row in self.rows for t, m in zip(row.token_ids, row.mask) if m]


@dataclass(frozen=True)
class GroupSpec:
    """Work for the rollout side: start `size` samples of one prompt or env seed.

    `payload` is what the pipeline's episode needs to start (the `Example`, or the env seed); the
    samples' seeds derive from (run seed, `group_id`, sample index), so whichever worker runs a sample
    draws the same tokens for the same weights. `indices` says which samples of the group this piece
    holds (a group may be spread over several workers).
    """

    group_id: int
    prompt_id: int
    payload: Any
    indices: tuple[int, ...]
    eval: bool = False
    attempt: int = 0  # > 0: launched again after an earlier run was stopped (tail batching's deferral)
