"""Preference losses (docs/algorithms.md §6) against hand-computed numbers."""

import math

import pytest
import torch

from rollmill.algos.preference import PREFERENCE_LOSSES, dpo_sigmoid_loss, ipo_loss, preference_loss, sequence_logps

# pair 1: h = (-3 + 4) - (-5 + 4) = 2; pair 2: h = (-6 + 5) - (-2 + 3) = -2
CHOSEN, REJECTED = torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -2.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-4.0, -5.0]), torch.tensor([-4.0, -3.0])


def test_dpo_sigmoid_loss_and_implicit_rewards():
    out = dpo_sigmoid_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    # -log sigmoid(0.2) = log(1 + e^-0.2), -log sigmoid(-0.2) = log(1 + e^0.2)
    assert torch.allclose(out.loss, torch.tensor([0.598139, 0.798139]), atol=1e-6)
    assert torch.allclose(out.chosen_reward, torch.tensor([0.1, -0.1])) and torch.allclose(out.rejected_reward, torch.tensor([-0.1, 0.1]))


def test_label_smoothing_mixes_both_directions():
    out = dpo_sigmoid_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, label_smoothing=0.1)
    assert math.isclose(float(out.loss[0]), 0.9 * 0.598139 + 0.1 * 0.798139, abs_tol=1e-6)  # 0.618139


def test_ipo_is_squared_distance_to_half_inverse_beta():
    out = ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    assert torch.allclose(out.loss, torch.tensor([9.0, 49.0]))  # (2 - 5)^2, (-2 - 5)^2
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid losses"):
        ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, label_smoothing=0.1)


def test_sequence_logps_sum_or_mean_over_valid_tokens():
    logps = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -2.0], [float("nan"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert torch.equal(sequence_logps(logps, mask), torch.tensor([-3.0, -3.0, 0.0]))
    assert torch.allclose(sequence_logps(logps, mask, average=True), torch.tensor([-1.5, -1.0, 0.0]))


def test_length_normalised_dpo_uses_per_token_means():
    tokens = {"chosen": torch.tensor([[-1.0, -2.0, 0.0]]), "rejected": torch.tensor([[-2.0, -2.0, -2.0]]),
              "ref_chosen": torch.tensor([[-1.5, -1.5, 0.0]]), "ref_rejected": torch.tensor([[-1.0, -1.0, -1.0]])}
    masks = {"chosen": torch.tensor([[1, 1, 0]]), "rejected": torch.tensor([[1, 1, 1]])}
    # means: h = (-1.5 + 1.5) - (-2 + 1) = 1; sums: h = (-3 + 3) - (-6 + 3) = 3; beta 0.5
    assert math.isclose(float(preference_loss("dpo_norm", tokens, masks, beta=0.5).loss), 0.474077, abs_tol=1e-6)
    assert math.isclose(float(preference_loss("sigmoid", tokens, masks, beta=0.5).loss), 0.201413, abs_tol=1e-6)
    with pytest.raises(ValueError, match=r"unknown preference loss 'kto'; allowed: \['dpo_norm', 'ipo', 'sigmoid'\]"):
        preference_loss("kto", tokens, masks)


def test_the_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    for name in PREFERENCE_LOSSES:
        fn = PREFERENCE_LOSSES[name][0]
        chosen.grad = rejected.grad = None
        fn(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=0.1).loss.sum().backward()
        assert (chosen.grad < 0).all() and (rejected.grad > 0).all(), name  # descent raises chosen, lowers rejected
