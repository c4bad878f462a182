"""Worked examples of docs/algorithms.md §1.2, §1.3, §2.1, §2.6, §2.7, §2.12 asserted to 1e-5, edge cases, gradients."""

import numpy as np
import pytest
import torch

from rollmill.algos.advantages import ADVANTAGES
from rollmill.algos.gae import gae_advantages, token_rewards_from_outcome, value_loss
from rollmill.algos.kl import AdaptiveKLController
from rollmill.algos.normalize import RunningMoments, advantage_clip, normalize_rewards, reward_clip, whiten


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol)


R = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0]])
GROUP = [[0.866024, -0.866024, -0.866024, 0.866024], [0.499999, 0.499999, 0.499999, -1.499997]]
BATCH = [[0.724567, -1.207612, -1.207612, 0.724567], [0.724567, 0.724567, 0.724567, -1.207612]]
LITE = [[0.96609, -0.96609, -0.96609, 0.96609], [0.483045, 0.483045, 0.483045, -1.449135]]
RPP_BASELINE = [[0.999998, -0.999998, -0.999998, 0.999998], [0.499999, 0.499999, 0.499999, -1.499997]]
DR_GRPO = [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]


@pytest.mark.parametrize(
    "mean_type,std_type,expected",
    [("group", "group", GROUP), ("batch", "batch", BATCH), ("group", "batch", LITE), ("group", None, DR_GRPO)],
)
def test_normalization_worked_example(mean_type, std_type, expected):
    assert close(normalize_rewards(R, mean_type, std_type), expected)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("grpo", GROUP),
        ("dr_grpo", DR_GRPO),
        ("batch", BATCH),
        ("reinforce_pp", BATCH),
        ("lite_ppo", LITE),
        ("reinforce_pp_baseline", RPP_BASELINE),
    ],
)
def test_registry_worked_example(name, expected):
    out = ADVANTAGES[name](R)
    assert out.shape == R.shape and close(out, expected)


def test_rloo_worked_example_equals_leave_one_out_mean():
    assert close(ADVANTAGES["rloo"](torch.tensor([[1.0, 0, 0, 1]])), [[0.666667, -0.666667, -0.666667, 0.666667]])
    r = torch.tensor([[0.3, 1.0, -2.0]])
    loo = torch.stack([r[0, i] - torch.cat([r[0, :i], r[0, i + 1 :]]).mean() for i in range(3)])
    assert close(ADVANTAGES["rloo"](r), [loo.tolist()])


# ReMax's baseline is another sample's reward, not the group's own (tests/test_advantages_round2.py).
SELF_BASELINED = sorted(set(ADVANTAGES) - {"remax"})


@pytest.mark.parametrize("name", SELF_BASELINED)
def test_single_reward_gives_zero(name):
    out = ADVANTAGES[name](torch.tensor([[0.7]]))
    assert torch.isfinite(out).all() and close(out, [[0.0]])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "lite_ppo", "reinforce_pp_baseline"])
def test_group_of_one_gives_zero_for_group_baselines(name):
    out = ADVANTAGES[name](torch.tensor([[1.0], [0.0], [1.0]]))
    assert torch.isfinite(out).all() and close(out, [[0.0]] * 3)


@pytest.mark.parametrize("name", ["batch", "reinforce_pp"])
def test_group_of_one_uses_batch_statistics(name):
    # REINFORCE++ is meant for G=1: mean 2/3, unbiased std 0.57735 over the three rewards.
    out = ADVANTAGES[name](torch.tensor([[1.0], [0.0], [1.0]]))
    assert close(out, [[0.577350], [-1.154699], [0.577350]])


@pytest.mark.parametrize("name", SELF_BASELINED)
def test_all_equal_rewards_give_zero(name):
    out = ADVANTAGES[name](torch.full((2, 3), 0.4))
    assert torch.isfinite(out).all() and close(out, [[0.0] * 3] * 2)


def test_all_equal_group_in_mixed_batch_gives_zero_for_group_mean_estimators():
    rewards = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    for name in ("grpo", "dr_grpo", "rloo", "lite_ppo", "reinforce_pp_baseline"):
        assert close(ADVANTAGES[name](rewards)[0], [0.0, 0, 0]), name


def test_undefined_std_gives_zero_for_any_mean():
    # std over one reward is undefined -> 0, whatever the mean type; no std -> plain centring.
    assert close(normalize_rewards(torch.tensor([[3.0], [1.0]]), None, "group"), [[0.0], [0.0]])
    assert close(normalize_rewards(torch.tensor([[3.0], [1.0]]), "batch", None), [[1.0], [-1.0]])
    assert close(normalize_rewards(torch.tensor([[3.0, 1.0]]), None, None), [[3.0, 1.0]])


def test_normalization_rejects_bad_input():
    with pytest.raises(ValueError, match="prompts, group"):
        normalize_rewards(torch.tensor([1.0, 0.0]), "group", "group")
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_rewards(R, "grop", None)
    with pytest.raises(ValueError, match="RunningMoments"):
        normalize_rewards(R, "running", None)


def test_integer_rewards_are_promoted_and_float64_kept():
    assert ADVANTAGES["grpo"](R.long()).dtype == torch.float32
    assert ADVANTAGES["grpo"](R.double()).dtype == torch.float64


def test_running_moments_match_numpy_and_round_trip():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=n) for n in (1, 7, 64, 3)]
    rm = RunningMoments()
    assert rm.std == 0.0 and rm.var == 0.0
    for b in batches:
        rm.update(torch.tensor(b))
    allv = np.concatenate(batches)
    assert rm.count == allv.size
    assert rm.mean == pytest.approx(allv.mean(), abs=1e-12)
    assert rm.var == pytest.approx(allv.var(), abs=1e-10)
    assert rm.std == pytest.approx(allv.std(ddof=1), abs=1e-10)
    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    extra = torch.tensor([5.0, -1.0])
    rm.update(extra)
    clone.update(extra)
    assert clone.state_dict() == rm.state_dict()


def test_running_normalization_uses_history_including_this_batch():
    rm = RunningMoments()
    first = normalize_rewards(R, "running", "running", running=rm)
    assert close(first, BATCH)  # the history is exactly this batch
    second = normalize_rewards(torch.tensor([[2.0, 2.0]]), "running", "running", running=rm)
    allv = np.array([1.0, 0, 0, 1, 1, 1, 1, 0, 2, 2])
    assert close(second, [[(2 - allv.mean()) / (allv.std(ddof=1) + 1e-6)] * 2])
    fresh = RunningMoments()
    assert close(normalize_rewards(torch.tensor([[5.0]]), "running", "running", running=fresh), [[0.0]])


def test_clips():
    x = torch.tensor([-12.0, -1.0, 0.5, 11.0])
    assert close(reward_clip(x, 10.0), [-10.0, -1.0, 0.5, 10.0])
    assert close(advantage_clip(x, 2.0), [-2.0, -1.0, 0.5, 2.0])
    assert reward_clip(x, None) is x and advantage_clip(x, None) is x
    with pytest.raises(ValueError, match="positive"):
        advantage_clip(x, 0.0)


def test_whiten_masked():
    values = torch.tensor([[1.0, 2, 3, 100], [4, 100, 100, 100]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    valid = np.array([1.0, 2, 3, 4])
    expected = (valid - valid.mean()) / (valid.std(ddof=1) + 1e-6)
    assert close(whiten(values, mask), [[*expected[:3], 0], [expected[3], 0, 0, 0]])


def test_whiten_disabled_with_at_most_one_valid_token():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert whiten(values, torch.tensor([[0.0, 1], [0, 0]])) is values
    assert whiten(values, torch.zeros(2, 2)) is values


def test_adaptive_kl_worked_example_and_state():
    ctl = AdaptiveKLController(init_coef=0.2, target=0.1, horizon=10000)
    ctl.update(0.15, n_steps=256)
    assert ctl.value == pytest.approx(0.201024, abs=1e-9)
    ctl.update(10.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.201024 * 1.00512, abs=1e-9)
    ctl.update(0.0, n_steps=256)  # error clipped to -0.2
    assert ctl.value == pytest.approx(0.201024 * 1.00512 * 0.99488, abs=1e-9)
    restored = AdaptiveKLController(init_coef=0.2, target=0.1, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller():
    ctl = AdaptiveKLController(init_coef=0.05, target=None)
    ctl.update(3.0, n_steps=10**6)
    assert ctl.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(target=0.0)


def test_token_rewards_from_outcome():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    kl = torch.tensor([[0.1, 0.2, -0.3, 9.0], [0.5, 9, 9, 9], [9.0, 9, 9, 9], [9.0, 0.4, 9, 0.2]], requires_grad=True)
    out = token_rewards_from_outcome(torch.tensor([1.0, 2.0, 3.0, -1.0]), mask, kl, beta=0.1)
    expected = [[-0.01, -0.02, 1.03, 0], [1.95, 0, 0, 0], [0, 0, 0, 0], [0, -0.04, 0, -1.02]]
    assert close(out, expected) and not out.requires_grad
    assert close(token_rewards_from_outcome(torch.tensor([1.0, 2, 3, -1]), mask)[0], [0, 0, 1.0, 0])
    with pytest.raises(ValueError, match="outcome"):
        token_rewards_from_outcome(torch.tensor([[1.0]]), mask)


def test_gae_worked_example_with_padding():
    rho = torch.tensor([[0.0, 0, 1, 0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 42.0]])  # value on the pad must not leak in
    mask = torch.tensor([[1.0, 1, 1, 0]])
    adv, ret = gae_advantages(rho, values, mask, gamma=1.0, lam=0.95)
    assert close(adv, [[0.46575, 0.385, 0.3, 0]])
    assert close(ret, [[0.96575, 0.985, 1.0, 0]])
    # TD errors: delta_t = A_t - gamma*lam*A_{t+1}
    assert close(adv[0, :3] - 0.95 * torch.cat([adv[0, 1:3], torch.zeros(1)]), [0.1, 0.1, 0.3])


def test_gae_skips_masked_tokens_and_fully_masked_rows():
    # An environment token (mask 0) between two policy tokens is skipped, so row 0 equals row 1.
    rho = torch.tensor([[0.0, 5.0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    values = torch.tensor([[0.5, 9.0, 0.6, 0.7], [0.5, 0.6, 0.7, 0], [1.0, 1, 1, 1]])
    mask = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    adv, ret = gae_advantages(rho, values, mask)
    assert close(adv[0, [0, 2, 3]], adv[1, :3].tolist()) and close(adv[2], [0.0] * 4) and close(ret[2], [0.0] * 4)
    assert adv[0, 1] == 0 and ret[0, 1] == 0


def test_gae_with_zero_values_and_lam_one_is_discounted_return():
    rho = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = gae_advantages(rho, torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    assert close(adv, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3]]) and close(ret, adv.tolist())


def test_value_loss_worked_example():
    old = torch.tensor([[0.5, 0.6, 0.7]])
    returns = torch.tensor([[0.96575, 0.985, 1.0]])
    new = torch.tensor([[0.9, 0.6, 0.9]])
    mask = torch.ones(1, 3)
    assert float(value_loss(new, old, returns, mask, clip_eps=0.2)) == pytest.approx(0.038141, abs=1e-5)
    unclipped = 0.5 * np.mean([(0.9 - 0.96575) ** 2, (0.6 - 0.985) ** 2, (0.9 - 1.0) ** 2])
    assert float(value_loss(new, old, returns, mask)) == pytest.approx(unclipped, abs=1e-6)


def test_value_loss_is_per_sequence_then_batch_mean():
    values = torch.tensor([[1.0, 1, 0], [3.0, 0, 0], [7.0, 7, 7]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [0, 0, 0]])  # third row fully masked: not counted
    out = value_loss(values, values, torch.zeros(3, 3), mask)
    assert float(out) == pytest.approx(0.5 * (1.0 + 9.0) / 2)


def test_value_loss_zero_valid_tokens_is_zero_and_differentiable():
    values = torch.ones(2, 3, requires_grad=True)
    out = value_loss(values, values.detach(), torch.zeros(2, 3), torch.zeros(2, 3), clip_eps=0.2)
    out.backward()
    assert out.item() == 0.0 and torch.equal(values.grad, torch.zeros(2, 3))


def test_value_loss_gradcheck():
    # Points chosen away from ties of the max and from the clip boundaries (non-differentiable there).
    values = torch.tensor([[0.9, 0.6, 0.93, 0.1], [0.2, -0.4, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.6, 0.7, 0.2], [0.3, 0.1, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[0.96575, 0.985, 1.0, 0.5], [0.8, 0.3, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    for clip in (None, 0.2):
        assert torch.autograd.gradcheck(lambda v, c=clip: value_loss(v, old, returns, mask, c), (values,))
    # Analytic form where clipping is active for token 0: gradient 0 there (clipped branch is constant).
    value_loss(values, old, returns, mask, 0.2).backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] == pytest.approx(0.5 * 2 * (0.6 - 0.985) / 4 / 2)
