"""KL to the reference as a reward penalty or a loss term, with a fixed or adaptive coefficient."""

import torch

from rollmill.config import AlgorithmConfig
from rollmill.train.kl_control import KLControl


def test_penalized_scores_subtract_beta_times_summed_token_kl():
    kl = KLControl(AlgorithmConfig(kl_coef=0.5, kl_placement="reward"))
    scores = torch.tensor([[1.0, 0.0]])
    token_kl = torch.tensor([[0.2, 0.2, 0.0], [0.5, 0.0, 0.0]])
    assert torch.allclose(kl.penalized_scores(scores, token_kl), torch.tensor([[0.8, -0.25]]))


def test_adaptive_coefficient_follows_the_spec_example_and_grows_when_kl_is_high():
    kl = KLControl(AlgorithmConfig(kl_coef=0.2, kl_target=0.1, kl_horizon=10000))
    mask = torch.ones(256, 1)
    metrics = kl.update(torch.full((256, 1), 0.15), mask)
    assert abs(metrics["kl/coef"] - 0.201024) < 1e-6 and abs(metrics["kl/reward_side"] - 0.15) < 1e-6


def test_reward_side_kl_shapes_rewards_in_a_run(tiny_cfg, tmp_path, make_job):
    cfg = tiny_cfg(algorithm={"kl_coef": 0.5, "kl_placement": "reward", "kl_estimator": "k1"}, eval={"before": False})
    job = make_job(cfg, tmp_path / "run")
    first, second = job.train_step()[0], job.train_step()[0]
    assert abs(first["kl/reward_side"]) < 1e-4  # the first batch is sampled by the reference itself
    assert abs(second["kl/reward_side"]) > 1e-3  # after one update at lr 1e-2 the policy has moved
    assert second["kl/coef"] == 0.5


def test_adaptive_loss_kl_resumes_exactly(tiny_cfg, straight_and_resumed):
    cfg = tiny_cfg(algorithm={"kl_coef": 0.1, "kl_target": 1e-4, "kl_horizon": 10})
    a, resumed = straight_and_resumed(cfg)
    assert a == resumed
    coefs = [r["kl/coef"] for r in a if "kl/coef" in r]
    # step 1 sees KL 0 (policy = reference): beta shrinks by the max 20% * 8 samples / horizon 10;
    # afterwards the KL is far above target and beta grows step after step
    assert abs(coefs[0] - 0.1 * (1 - 0.2 * 8 / 10)) < 1e-9
    assert coefs[1] < coefs[2] < coefs[3]
