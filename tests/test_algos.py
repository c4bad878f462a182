"""Worked examples from docs/algorithms.md, asserted to 1e-5, plus edge cases and gradients."""

import pytest
import torch

from rollmill.algos import aggregate_loss, group_normalized_advantages, kl_estimate, ppo_clip_loss
from rollmill.algos.advantages import dr_grpo_advantages


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), atol=tol)


R = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0]])


def test_group_normalization_worked_example():
    assert close(group_normalized_advantages(R), [[0.866024, -0.866024, -0.866024, 0.866024], [0.499999, 0.499999, 0.499999, -1.499997]])


def test_grpo_two_samples():
    assert close(group_normalized_advantages(torch.tensor([[1.0, 0.0]])), [[0.707106, -0.707106]])


def test_dr_grpo_is_mean_only():
    assert close(dr_grpo_advantages(R), [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])


def test_all_equal_group_and_group_of_one_give_zero():
    assert close(group_normalized_advantages(torch.tensor([[1.0, 1, 1]])), [[0, 0, 0]])
    single = group_normalized_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.isfinite(single).all() and close(single, [[0.0], [0.0]])


def test_advantages_reject_flat_input():
    with pytest.raises(ValueError, match="prompts, group"):
        group_normalized_advantages(torch.tensor([1.0, 0.0]))


LOSS = torch.tensor([[1.0, 2, 3, 0], [4, 0, 0, 0]])
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode,expected",
    [("token-mean", 2.5), ("seq-mean-token-sum", 5.0), ("seq-mean-token-mean", 3.0), ("seq-mean-token-sum-norm", 2.5)],
)
def test_aggregation_worked_example(mode, expected):
    assert aggregate_loss(LOSS, MASK, mode, norm_length=4) == pytest.approx(expected, abs=1e-6)


def test_aggregation_fully_masked_row_and_zero_tokens():
    mask = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0]])
    assert aggregate_loss(LOSS, mask, "seq-mean-token-mean") == pytest.approx(2.0)  # masked row not counted in N
    zero = aggregate_loss(LOSS, torch.zeros_like(MASK), "token-mean")
    assert float(zero) == 0.0


def test_aggregation_with_global_denominators_matches_whole_batch():
    whole = aggregate_loss(LOSS, MASK, "token-mean")
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "token-mean", num_tokens=4.0) for i in range(2))
    assert float(parts) == pytest.approx(float(whole))
    whole = aggregate_loss(LOSS, MASK, "seq-mean-token-mean")
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "seq-mean-token-mean", num_seqs=2.0) for i in range(2))
    assert float(parts) == pytest.approx(float(whole))


def test_kl_estimators_worked_example():
    lp, ref = torch.tensor([-1.0, -2, -0.5]), torch.tensor([-1.2, -1.5, -0.5])
    assert close(kl_estimate("k1", lp, ref), [0.2, -0.5, 0])
    assert close(kl_estimate("k2", lp, ref), [0.02, 0.125, 0])
    assert close(kl_estimate("k3", lp, ref), [0.018731, 0.148721, 0])
    with pytest.raises(ValueError, match="k3"):
        kl_estimate("k4", lp, ref)


def test_ppo_clip_worked_example():
    ratio = torch.tensor([0.5, 1.1, 1.3, 1.3, 0.5, 4.0])
    adv = torch.tensor([1.0, 1, 1, -1, -1, -1])
    out = ppo_clip_loss(ratio.log(), torch.zeros(6), adv, clip_eps=0.2)
    assert close(out.token_loss, [-0.5, -1.1, -1.2, 1.3, 0.8, 4.0])
    assert out.clipped.tolist() == [False, False, True, False, True, False]


def test_clip_higher_worked_example():
    out = ppo_clip_loss(torch.tensor([1.3]).log(), torch.zeros(1), torch.ones(1), clip_eps=0.2, clip_eps_high=0.28)
    assert close(out.token_loss, [-1.28])


def test_ppo_clip_gradient_matches_analytic_form():
    # d/dlogp of -min(rA, clip(r)A): -rA where the unclipped branch is active, 0 where clipped.
    logp = torch.tensor([0.5, 1.1, 1.3, 1.3, 0.5, 4.0]).log().requires_grad_(True)
    adv = torch.tensor([1.0, 1, 1, -1, -1, -1])
    out = ppo_clip_loss(logp, torch.zeros(6), adv, clip_eps=0.2)
    out.token_loss.sum().backward()
    ratio = logp.detach().exp()
    expected = torch.where(out.clipped, torch.zeros(6), -ratio * adv)
    assert close(logp.grad, expected.tolist())
