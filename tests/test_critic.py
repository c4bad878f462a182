"""PPO's critic: values at the right positions, GAE advantages, a value loss that falls, resume."""

import pytest
import torch

from rollmill.config import AlgorithmConfig, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.types import Row
from rollmill.train import build_batch
from rollmill.train.critic import CriticTrainer


def fixed_batch(vocab):
    g = torch.Generator().manual_seed(0)
    comps = [
        Row.sampled(torch.randint(3, vocab, (4,), generator=g).tolist(),
                    torch.randint(3, vocab, (n,), generator=g).tolist(), [-1.0] * n)
        for n in (3, 5, 2, 4)
    ]
    return build_batch(comps, torch.zeros(4), pad_id=2)


def make_critic(**algo):
    tok = build_char_tokenizer()
    policy = build_tiny_model(len(tok), seed=0)
    cfg = AlgorithmConfig(name="ppo", critic_lr=1e-2, **algo)
    return CriticTrainer(policy, TrainConfig(micro_batch_size=3), cfg), len(tok)


def test_value_head_starts_at_zero_so_first_advantages_are_returns():
    critic, vocab = make_critic(whiten_advantages=False, advantage_clip=None)
    batch = fixed_batch(vocab)
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.5])
    adv, returns, old = critic.advantages(batch, outcome)
    assert torch.equal(old, torch.zeros_like(old))
    # gamma 1, V = 0: GAE gives A_t = lam^(T-1-t) * R, and the return G = A + V = A
    lengths = batch.mask.sum(-1).long()
    expected = torch.zeros_like(returns)
    for i, n in enumerate(lengths.tolist()):
        expected[i, :n] = outcome[i] * 0.95 ** torch.arange(n - 1, -1, -1, dtype=torch.float32)
    assert torch.allclose(returns, expected)
    assert torch.allclose(adv, returns)


def test_value_loss_falls_on_a_fixed_batch():
    critic, vocab = make_critic()
    batch = fixed_batch(vocab)
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.5])
    losses = []
    for _ in range(8):
        _, returns, old = critic.advantages(batch, outcome)
        losses.append(critic.step(batch, old, returns)["value_loss"])
    assert losses[-1] < 0.2 * losses[0], losses


def test_micro_batching_gives_the_same_value_gradient():
    grads = []
    for micro in (4, 1):
        critic, vocab = make_critic()
        critic.cfg = TrainConfig(micro_batch_size=micro)
        batch = fixed_batch(vocab)
        _, returns, old = critic.advantages(batch, torch.tensor([1.0, 0.0, 1.0, 0.5]))
        critic.step(batch, old, returns)
        grads.append(torch.cat([p.grad.flatten() for p in critic.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
def test_ppo_run_resumes_exactly_with_its_critic(tiny_cfg, tmp_path, straight_and_resumed):
    a, resumed = straight_and_resumed(tiny_cfg(algorithm={"name": "ppo", "track_kl": False}))
    assert a == resumed and all("value_loss" in r for r in a if "reward/mean" in r)
    assert (tmp_path / "straight" / "checkpoints" / "step_000004" / "critic.safetensors").is_file()
