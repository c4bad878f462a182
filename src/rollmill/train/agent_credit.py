"""Per-turn advantages for agent trajectories, by the configured credit rule, and their tokens.

Orchestration only: the formulas are in `rollmill.algos.agentic` (and the scalar estimators for
StarPO). Trajectories arrive group-major: `group_size` consecutive episodes share an env seed.
"""

from __future__ import annotations

import torch

from rollmill.algos.agentic import (
    balance_turning_points,
    gigpo_advantages,
    ipa_chunk_returns,
    per_step_group_advantages,
    turning_point_rewards,
)
from rollmill.config import AgentConfig
from rollmill.train.advantage_computer import AdvantageComputer
from rollmill.types import Trajectory


def turn_advantages(trajs: list[Trajectory], agent: AgentConfig, scalar: AdvantageComputer,
                    group_size: int) -> list[torch.Tensor]:
    """One 1-D tensor per trajectory holding one advantage per turn."""
    groups = [t.group_id for t in trajs]
    if agent.credit == "starpo":
        scores = torch.tensor([t.reward for t in trajs], dtype=torch.float32).view(-1, group_size)
        # an episode's length is every token the policy sampled in it (OPO weighs its baseline by them)
        lengths = torch.tensor([t.sampled_tokens for t in trajs], dtype=torch.float32).view(-1, group_size)
        per_episode = scalar(scores, torch.ones(len(trajs), 1), lengths).reshape(len(trajs), -1)[:, 0]
        return [torch.full((t.num_turns,), float(a)) for t, a in zip(trajs, per_episode)]
    if agent.credit == "gigpo":
        rewards = [torch.tensor([turn.reward for turn in t.turns], dtype=torch.float32) for t in trajs]
        states = [[turn.state for turn in t.turns] for t in trajs]
        return gigpo_advantages(rewards, states, groups, gamma=agent.turn_gamma, step_weight=agent.gigpo_step_weight,
                                scale_by_std=agent.gigpo_scale_by_std, eps=scalar.algo.std_eps)
    if agent.credit == "ipa":
        returns = ipa_chunk_returns([t.num_turns for t in trajs], [t.reward for t in trajs], [t.success for t in trajs],
                                    gamma=agent.turn_gamma, failure_reward=agent.ipa_failure_reward)
        return _with_penalties(returns, trajs, agent)
    values = [progress_values(t) for t in trajs]
    step_rewards, flags = map(list, zip(*(turning_point_rewards(v, eta=agent.tp_eta) for v in values)))
    if agent.tp_balance:
        step_rewards, flags = balance_turning_points(step_rewards, flags, values)
    # TurningPoint keeps its reference's 1e-4 (algos/agentic.py), not algorithm.std_eps
    return per_step_group_advantages(_with_penalties(step_rewards, trajs, agent), groups)


def _with_penalties(values: list[torch.Tensor], trajs: list[Trajectory], agent: AgentConfig) -> list[torch.Tensor]:
    """Outcome- and progress-based rules (IPA, TurningPoint) see nothing of malformed replies: each
    invalid turn's penalty is added to that turn's value, as an immediate reward."""
    return [v + torch.tensor([agent.invalid_action_penalty * turn.invalid for turn in t.turns])
            for v, t in zip(values, trajs)]


def progress_values(traj: Trajectory) -> list[float]:
    """R_0..R_n for TurningPoint credit: the env's progress estimates, carried forward where missing.

    Without any estimate the sequence is flat until the outcome (R_n = 1 on success), which
    reduces TurningPoint to outcome credit (docs/algorithms.md §4.4).
    """
    values = [traj.initial_progress if traj.initial_progress is not None else 0.0]
    for turn in traj.turns:
        values.append(turn.progress if turn.progress is not None else values[-1])
    if all(turn.progress is None for turn in traj.turns):
        values[-1] = float(traj.success)
    return values


def token_advantages(traj: Trajectory, per_turn: torch.Tensor) -> list[list[float]]:
    """Each row's tokens get their turn's advantage; env tokens get 0 (they carry mask 0 anyway)."""
    values = per_turn.tolist()
    return [[values[k] if k >= 0 else 0.0 for k in row.turn_of_token] for row in traj.rows]
