"""Worked examples of docs/algorithms.md §4.2-§4.4 (GiGPO, IPA, TP-GRPO turning points), edge cases, gradients."""

import math

import pytest
import torch
from torch.testing import assert_close

from rollmill.algos.agentic import (
    AGENT_CREDITS,
    balance_turning_points,
    discounted_returns,
    gigpo_advantages,
    ipa_chunk_returns,
    per_step_group_advantages,
    segment_log_ratio,
    segment_mean,
    segment_mismatch_mask,
    turning_point_rewards,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def close(actual, expected, tol=1e-5):
    assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_agent_credit_names():
    assert AGENT_CREDITS == ("starpo", "gigpo", "ipa", "turning_point")


def test_discounted_returns():
    close(discounted_returns(t(1, 2, 3), 0.5), [2.75, 3.5, 3.0])
    close(discounted_returns(t(0, 0, 1), 0.95), [0.9025, 0.95, 1.0])
    assert discounted_returns(t(), 0.95).shape == (0,)


# §4.2 example: group of 2; A: s0 -> s1 -> s2 with rewards [0, 0, 1]; B: s0 -> s3 with [0, 0].
GIGPO = dict(step_rewards=[t(0, 0, 1), t(0, 0)], states=[["s0", "s1", "s2"], ["s0", "s3"]], group_ids=[0, 0])


def test_gigpo_mean_norm_worked_example():
    a, b = gigpo_advantages(**GIGPO, scale_by_std=False)
    close(a, [0.95125, 0.5, 0.5])
    close(b, [-0.95125, -0.5])


def test_gigpo_mean_std_worked_example():
    # Unbiased std of a pair is |x1 - x2| / sqrt(2): both terms become ±0.707106 (population std gives ±1).
    a, b = gigpo_advantages(**GIGPO)
    close(a, [1.414212, 0.707106, 0.707106])
    close(b, [-1.414212, -0.707106])


def test_gigpo_weights_separate_the_terms():
    a, b = gigpo_advantages(**GIGPO, episode_weight=0.0)
    close(a, [0.707106, 0.0, 0.0])
    close(b, [-0.707106, 0.0])
    a, b = gigpo_advantages(**GIGPO, step_weight=0.0, scale_by_std=False)
    close(a, [0.5, 0.5, 0.5])
    close(b, [-0.5, -0.5])


def test_gigpo_anchor_groups_do_not_cross_prompt_groups():
    # Same state name and rewards as the example, but B belongs to another prompt: every group is a singleton.
    a, b = gigpo_advantages(GIGPO["step_rewards"], GIGPO["states"], group_ids=[0, 1])
    close(a, [0.0, 0.0, 0.0])
    close(b, [0.0, 0.0])


def test_gigpo_zero_std_gives_zero():
    a, b = gigpo_advantages([t(1, 0), t(1, 0)], [["s0", "s1"], ["s0", "s1"]], [0, 0])
    close(a, [0.0, 0.0])
    close(b, [0.0, 0.0])


def test_algorithm_std_eps_reaches_gigpo():
    from rollmill.config import AgentConfig
    from rollmill.config.algorithm import AlgorithmConfig
    from rollmill.train.advantage_computer import AdvantageComputer
    from rollmill.train.agent_credit import turn_advantages
    from rollmill.types import Trajectory, Turn

    trajs = []
    for index, (rewards, states) in enumerate(zip(GIGPO["step_rewards"], GIGPO["states"])):
        traj = Trajectory(0, index, 0)
        traj.turns = [Turn("r", "a", "o", float(r), s, None, False, 0, "stop") for r, s in zip(rewards, states)]
        trajs.append(traj)
    agent = AgentConfig(credit="gigpo", turn_gamma=0.95)
    # eps 1: the episode term of the worked example is 0.5 / (0.707107 + 1) instead of 0.5 / 0.707107
    a, b = turn_advantages(trajs, agent, AdvantageComputer(AlgorithmConfig(std_eps=1.0)), group_size=2)
    close(a, gigpo_advantages(**GIGPO, eps=1.0)[0])
    close(a[2], 0.5 / (0.5 ** 0.5 + 1))  # s2 is visited once: its step term is 0


def test_opo_in_agentic_runs_weighs_each_episode_by_the_tokens_it_sampled():
    from rollmill.config import AgentConfig
    from rollmill.config.algorithm import AlgorithmConfig
    from rollmill.train.advantage_computer import AdvantageComputer
    from rollmill.train.agent_credit import turn_advantages
    from rollmill.types import Row, Trajectory, Turn

    trajs = []
    for index, (reward, tokens) in enumerate([(1.0, 4), (0.0, 2), (0.0, 2), (1.0, 8)]):  # §C.2's first group
        row = Row([5], [7] * (tokens + 1), [1] * tokens + [0])  # the env token after the reply is not sampled
        trajs.append(Trajectory(0, index, 0, [row], [Turn("r", "a", "o", reward, None, None, False, 0, "stop")]))
    per_turn = turn_advantages(trajs, AgentConfig(credit="starpo"), AdvantageComputer(AlgorithmConfig(advantage="opo")),
                               group_size=4)
    close(torch.cat(per_turn), [0.25, -0.75, -0.75, 0.25])  # b = 0.75; the group mean 0.5 would give ±0.5


def test_gigpo_rejects_misaligned_states():
    with pytest.raises(ValueError, match="2 step rewards but 1 states"):
        gigpo_advantages([t(0, 1)], [["s0"]], [0])


def test_ipa_chunk_returns_worked_example_and_failures():
    ok, failed, short = ipa_chunk_returns([3, 2, 1], [1.0, 0.3, 2.0], [True, False, True])
    close(ok, [0.9025, 0.95, 1.0])
    close(failed, [0.0, 0.0])  # failure_reward None: learn from successes only
    close(short, [2.0])
    (failed,) = ipa_chunk_returns([2], [0.3], [False], failure_reward=-0.5)
    close(failed, [-0.475, -0.5])


def test_segment_mean_hand_computed():
    values = torch.tensor([[1.0, 2, -math.inf, 4, 5], [6, 7, 8, 9, 10]])  # -inf at a masked position
    segments = torch.tensor([[0, 0, -1, 1, 1], [2, 2, 2, 0, -1]])
    mask = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    # Row 1 reuses id 0: its chunk must not mix with row 0's chunk 0.
    close(segment_mean(values, segments, mask), [[1.5, 1.5, 0, 4.5, 4.5], [7, 7, 7, 9, 0]])


def test_segment_log_ratio_gradient_splits_chunk_gradient_evenly():
    logp = torch.tensor([[-1.0, -2, -math.inf, -0.5, -0.7], [-0.1, -0.2, -0.3, -0.4, -0.5]], requires_grad=True)
    old_logp = torch.tensor([[-1.5, -1.5, 0, -0.5, -0.5], [-0.1, -0.1, -0.1, -0.5, 0]])
    segments = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 0, 0]])
    mask = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    log_ratio = segment_log_ratio(logp, old_logp, segments, mask)
    close(log_ratio.detach(), [[0.0, 0.0, 0.0, -0.1, -0.1], [-0.1, -0.1, -0.1, 0.1, 0.0]])
    weights = torch.tensor([[1.0, 2, 3, 4, 5], [2, 0, 1, 4, 7]])
    (weights * log_ratio).sum().backward()
    # d/d logp_t = sum of the chunk's weights / chunk size; masked tokens get nothing.
    close(logp.grad, [[1.5, 1.5, 0, 4.5, 4.5], [1, 1, 1, 4, 0]])


def test_segment_ratio_in_ppo_loss_is_shared_by_the_chunk():
    from rollmill.algos.losses import ppo_clip_loss

    logp = torch.tensor([[0.1, 0.3, -0.2]])
    old_logp = torch.zeros(1, 3)
    log_ratio = segment_log_ratio(logp, old_logp, torch.tensor([[0, 0, 1]]), torch.ones(1, 3))
    out = ppo_clip_loss(old_logp + log_ratio, old_logp, torch.ones(1, 3))
    close(out.ratio, [[1.221403, 1.221403, 0.818731]])


# §4.3 mismatch example, with env-observation and padding tokens (mask 0) between the chunks.
OLD_MINUS_BEH = torch.tensor([[0.1, 0.3, 9.0, 2.0, 1.5, 9.0, -0.2, 9.0]])
CHUNKS = torch.tensor([[0, 0, -1, 1, 1, -1, 2, -1]])
POLICY = torch.tensor([[1.0, 1, 0, 1, 1, 0, 1, 0]])


def test_segment_mismatch_ratios_worked_example():
    ratio = torch.exp(segment_mean(OLD_MINUS_BEH, CHUNKS, POLICY))
    close(ratio[POLICY > 0], [1.221403, 1.221403, 5.754603, 5.754603, 0.818731])


def test_segment_mismatch_mask_worked_example():
    beh = torch.full_like(OLD_MINUS_BEH, -2.0)
    close(segment_mismatch_mask(beh + OLD_MINUS_BEH, beh, CHUNKS, POLICY), [[1.0, 1, 0, 0, 0, 0, 1, 0]])
    close(segment_mismatch_mask(beh + OLD_MINUS_BEH, beh, CHUNKS, POLICY, lower=1.0), [[1.0, 1, 0, 0, 0, 0, 0, 0]])


def test_turning_points_worked_example():
    rewards, turning = turning_point_rewards([0.5, 0.4, 0.55, 0.6, 0.7])
    assert turning.tolist() == [False, True, False, False]
    close(rewards, [-0.1, 0.3, 0.05, 0.1])
    rewards, _ = turning_point_rewards([0.5, 0.4, 0.55, 0.6, 0.7], eta=0.5)
    close(rewards, [-0.1, 0.15, 0.05, 0.1])


def test_turning_point_first_step_and_last_step():
    rewards, turning = turning_point_rewards([0.0, 0.5, 1.0])
    assert turning.tolist() == [True, False]  # last step: R_n - R_n = 0 fails the sign test
    close(rewards, [1.0, 0.5])
    rewards, turning = turning_point_rewards([0.7])
    assert rewards.shape == turning.shape == (0,)


# A batch with 3 positive turning points (episode Deltas 0.2, 1.0, 0.3) and 1 negative one (Delta -0.4).
BATCH_VALUES = [[0.5, 0.4, 0.55, 0.6, 0.7], [0.0, 0.5, 1.0], [0.2, 0.3, 0.5], [0.5, 0.6, 0.3, 0.1]]


def test_balance_turning_points_keeps_largest_delta_per_sign():
    rewards, flags = map(list, zip(*(turning_point_rewards(v) for v in BATCH_VALUES)))
    expected_flags = [[False, True, False, False], [True, False], [True, False], [False, True, False]]
    assert [f.tolist() for f in flags] == expected_flags
    close(rewards[3], [0.1, -0.5, -0.2])
    before = [r.clone() for r in rewards]
    balanced, kept = balance_turning_points(rewards, flags, BATCH_VALUES)
    # min(3, 1) = 1 of each sign: the positive one of episode 1 (|Delta| 1.0) and the only negative one.
    assert [f.tolist() for f in kept] == [[False] * 4, [True, False], [False, False], [False, True, False]]
    close(balanced[0], [-0.1, 0.15, 0.05, 0.1])
    close(balanced[1], [1.0, 0.5])
    close(balanced[2], [0.1, 0.2])
    close(balanced[3], [0.1, -0.5, -0.2])
    for r, b in zip(rewards, before):  # inputs untouched
        close(r, b)


def test_balance_turning_points_one_sign_is_unchanged():
    rewards, flags = map(list, zip(*(turning_point_rewards(v) for v in BATCH_VALUES[:3])))
    balanced, kept = balance_turning_points(rewards, flags, BATCH_VALUES[:3])
    for a, b in zip(balanced, rewards):
        close(a, b)
    assert [f.tolist() for f in kept] == [f.tolist() for f in flags]


def test_per_step_group_advantages_with_uneven_lengths():
    a, b, c, d = per_step_group_advantages([t(1, 2, 3), t(3, 0), t(5), t(1, 4)], group_ids=[0, 0, 1, 1])
    # group 0: t0 {1, 3} (pop std 1), t1 {2, 0} (pop std 1), t2 only a; group 1: t0 {5, 1} (std 2), t1 only d.
    close(a, [-1 / 1.0001, 1 / 1.0001, 0.0], tol=1e-6)
    close(b, [1 / 1.0001, -1 / 1.0001], tol=1e-6)
    close(c, [2 / 2.0001], tol=1e-6)
    close(d, [-2 / 2.0001, 0.0], tol=1e-6)


def test_per_step_group_advantages_lone_episode_and_equal_rewards():
    lone, same1, same2 = per_step_group_advantages([t(1, 2), t(0.3, 0.3), t(0.3, 0.3)], group_ids=[7, 8, 8])
    close(lone, [0.0, 0.0])
    close(same1, [0.0, 0.0])
    close(same2, [0.0, 0.0])
