"""The composable advantage settings: normalization choice, reward/advantage clip, whitening, running state."""

import torch

from rollmill.config import AlgorithmConfig
from rollmill.train.advantage_computer import AdvantageComputer

R = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0]])
MASK = torch.ones(8, 3)


def test_normalized_batch_mean_without_std():
    adv = AdvantageComputer(AlgorithmConfig(advantage="normalized", norm_mean="batch", norm_std=None))(R, MASK)
    assert torch.allclose(adv, (R - 0.625).flatten())


def test_normalized_group_group_equals_grpo_and_clips():
    adv = AdvantageComputer(AlgorithmConfig(advantage="normalized", advantage_clip=1.0))(R, MASK)
    grpo = AdvantageComputer(AlgorithmConfig(advantage="grpo"))(R, MASK)
    assert torch.allclose(adv, grpo.clamp(-1, 1))
    assert adv.min() == -1.0


def test_reward_clip_applies_before_normalizing():
    big = torch.tensor([[10.0, 0.0]])
    adv = AdvantageComputer(AlgorithmConfig(advantage="normalized", norm_std=None, reward_clip=1.0))(big, torch.ones(2, 1))
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]))


def test_whitening_gives_token_advantages_with_zero_mean_over_valid_tokens():
    mask = torch.tensor([[1.0, 1, 0]] * 4 + [[1.0, 0, 0]] * 4)
    adv = AdvantageComputer(AlgorithmConfig(advantage="dr_grpo", whiten_advantages=True))(R, mask)
    assert adv.shape == (8, 3)
    assert abs(float((adv * mask).sum())) < 1e-5 and float((adv * (1 - mask)).abs().sum()) == 0.0


def test_running_normalization_resumes_exactly(tiny_cfg, straight_and_resumed):
    cfg = tiny_cfg(algorithm={"advantage": "normalized", "norm_mean": "running", "norm_std": "running"})
    straight, resumed = straight_and_resumed(cfg)
    assert straight == resumed
