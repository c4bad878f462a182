"""The settings table of docs/algorithms.md (Appendix D): each row's rollmill config gives the same
advantages, loss and gradient as TRL's GRPOTrainer (1.16) or verl (core_algos.py) on shared inputs.

The reference side restates each framework's formula as its source code computes it (neither is a
test dependency); the rollmill side goes through the same registries and denominators the trainer
uses (`rollmill_loss`), and `test_rollmill_loss_is_what_the_trainer_minimizes` ties the two together.
"""

from __future__ import annotations

import pytest
import torch

from rollmill.algos import POLICY_LOSSES, aggregate_loss, kl_estimate
from rollmill.algos.aggregation import count_seqs
from rollmill.algos.kl import importance_weighted_kl
from rollmill.algos.normalize import decoupled_group_scores
from rollmill.config import AlgorithmConfig, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.train import build_batch
from rollmill.train.advantage_computer import AdvantageComputer
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.trainer import PolicyTrainer, loss_params
from rollmill.types import Row

MAX_LEN = 6
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 1.0, 1.0, 0.0]])  # 2 prompts x 4 samples
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0],
                     [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
OLD = -torch.linspace(0.3, 2.5, 40).view(8, 5)
# ratios from e^-0.9 to e^+1.6: some inside the clip, some beyond it, some past verl's dual-clip bound 3
SHIFT = torch.linspace(-0.9, 1.6, 40).view(8, 5)[torch.randperm(8, generator=torch.Generator().manual_seed(0))]
REF = OLD + torch.linspace(-0.4, 0.6, 40).view(8, 5)


def rollmill_advantages(algo: AlgorithmConfig) -> torch.Tensor:
    return AdvantageComputer(algo)(REWARDS, MASK)[:, None]


def rollmill_loss(algo: AlgorithmConfig, logp, adv, old=OLD, ref=None, mask=MASK) -> torch.Tensor:
    """The loss `PolicyTrainer` minimizes for one mini-batch in one micro-batch, from its own pieces."""
    out = POLICY_LOSSES[algo.loss](logp, old, adv, mask=mask, **loss_params(algo, behaviour_logp=old))
    agg = dict(mode=algo.loss_agg, num_tokens=float(mask.sum()), num_seqs=count_seqs(mask, algo.loss_agg_seq_count),
               norm_length=algo.loss_agg_norm_length or MAX_LEN, norm_by_seqs=algo.loss_agg_norm_by_seqs)
    loss = aggregate_loss(out.token_loss, mask, **agg)
    if ref is not None and algo.kl_coef > 0:
        kl = kl_estimate(algo.kl_estimator, logp, ref, mask, algo.kl_clamp)
        term = importance_weighted_kl(kl, logp, old, mask) if algo.kl_ratio_weighted else kl
        loss = loss + algo.kl_coef * aggregate_loss(term, mask, **agg)
    return loss


# --- the references, as each framework's source computes them ---------------------------------------

def trl_advantages(scale_rewards: str = "group") -> torch.Tensor:
    """GRPOTrainer: R - group mean, divided by (group or batch) unbiased std + 1e-4 unless 'none'."""
    mean = REWARDS.mean(1, keepdim=True)
    std = REWARDS.std(1, keepdim=True) if scale_rewards == "group" else REWARDS.std().expand(2, 1)
    adv = REWARDS - mean
    return (adv if scale_rewards == "none" else adv / (std + 1e-4)).reshape(-1, 1)


def trl_loss(logp, adv, loss_type: str = "dapo", beta: float = 0.0, ref=None, eps: float = 0.2):
    """GRPOTrainer.compute_loss, one process, the whole generation batch in one accumulation step."""
    coef_1 = torch.exp(logp - OLD)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1) * coef_1  # use_bias_correction_kl
    if loss_type == "grpo":
        return ((per_token * MASK).sum(-1) / MASK.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * MASK).sum() / (per_token.size(0) * MAX_LEN)
    return (per_token * MASK).sum() / MASK.sum()  # dapo, the default: tokens of the generation batch


def verl_advantages(epsilon: float = 1e-6) -> torch.Tensor:
    """compute_grpo_outcome_advantage with norm_adv_by_std_in_grpo (unbiased torch.std)."""
    return ((REWARDS - REWARDS.mean(1, keepdim=True)) / (REWARDS.std(1, keepdim=True) + epsilon)).reshape(-1, 1)


def verl_loss(logp, adv, kl_coef: float = 0.0, ref=None, clip: float = 0.2, clip_c: float = 3.0):
    """compute_policy_loss_vanilla (dual clip with clip_ratio_c) + the low_var_kl loss, token-mean."""
    ratio = torch.exp(torch.clamp(logp - OLD, -20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    per_token = torch.where(adv < 0, torch.min(-adv * clip_c, clipped), clipped)
    loss = (per_token * MASK).sum() / MASK.sum()
    if kl_coef:
        d = torch.clamp(ref - logp, -20, 20)
        kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        loss = loss + kl_coef * (kl * MASK).sum() / MASK.sum()
    return loss


def same_value_and_gradient(ours, theirs, adv_ours, adv_theirs):
    assert torch.allclose(adv_ours, adv_theirs, atol=1e-6)
    logp_a, logp_b = (OLD + SHIFT).requires_grad_(), (OLD + SHIFT).requires_grad_()
    a, b = ours(logp_a, adv_ours), theirs(logp_b, adv_theirs)
    a.backward(), b.backward()
    assert torch.allclose(a, b, atol=1e-6), (float(a), float(b))
    assert torch.allclose(logp_a.grad, logp_b.grad, atol=1e-6)


TRL_DEFAULT = dict(advantage="grpo", std_eps=1e-4, loss="ppo_clip", clip_eps=0.2, loss_agg="token-mean")
VERL_GRPO = dict(advantage="grpo", loss="ppo_clip", clip_eps=0.2, dual_clip_c=3.0, loss_agg="token-mean")


@pytest.mark.parametrize("row, ours, loss_type, scale", [
    ("TRL default (loss_type dapo, scale_rewards group)", {}, "dapo", "group"),
    ("TRL loss_type grpo", {"loss_agg": "seq-mean-token-mean", "loss_agg_seq_count": "all"}, "grpo", "group"),
    ("TRL loss_type dr_grpo, scale_rewards none",
     {"advantage": "dr_grpo", "loss_agg": "seq-mean-token-sum-norm", "loss_agg_seq_count": "all",
      "loss_agg_norm_by_seqs": True, "loss_agg_norm_length": MAX_LEN}, "dr_grpo", "none"),
    ("TRL scale_rewards batch", {"advantage": "lite_ppo"}, "dapo", "batch"),
])
def test_trl_settings(row, ours, loss_type, scale):
    algo = AlgorithmConfig(**{**TRL_DEFAULT, **ours})
    same_value_and_gradient(lambda lp, a: rollmill_loss(algo, lp, a), lambda lp, a: trl_loss(lp, a, loss_type),
                            rollmill_advantages(algo), trl_advantages(scale))


def test_trl_kl_term_unclamped_and_ratio_weighted():
    algo = AlgorithmConfig(**TRL_DEFAULT, kl_coef=0.04, kl_clamp=None, kl_ratio_weighted=True)
    same_value_and_gradient(lambda lp, a: rollmill_loss(algo, lp, a, ref=REF),
                            lambda lp, a: trl_loss(lp, a, beta=0.04, ref=REF), rollmill_advantages(algo), trl_advantages())
    plain = AlgorithmConfig(**TRL_DEFAULT, kl_coef=0.04, kl_clamp=None)  # the row's knobs matter
    logp = (OLD + SHIFT).requires_grad_()
    rollmill_loss(plain, logp, rollmill_advantages(plain), ref=REF).backward()
    theirs = (OLD + SHIFT).requires_grad_()
    trl_loss(theirs, trl_advantages(), beta=0.04, ref=REF).backward()
    assert not torch.allclose(logp.grad, theirs.grad, atol=1e-6)


def test_trl_normalize_then_sum():
    """multi_objective_aggregation 'normalize_then_sum': each function normalized in its group (+1e-4),
    weighted sum, then normalized over the batch: reward.normalize_each with the 'batch' estimator."""
    terms = torch.stack([REWARDS, torch.tensor([[0.2, 0.9, 0.4, 0.4], [1.0, 0.0, 0.3, 0.6]])])
    weights = [1.0, 0.5]
    per_fn = (terms - terms.mean(2, keepdim=True)) / (terms.std(2, keepdim=True) + 1e-4)
    summed = (per_fn * torch.tensor(weights)[:, None, None]).sum(0)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    algo = AlgorithmConfig(advantage="batch", std_eps=1e-4)
    ours = AdvantageComputer(algo)(decoupled_group_scores(terms, weights, algo.std_eps), MASK).view(2, 4)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.001])
def test_verl_grpo_settings(kl_coef):
    algo = AlgorithmConfig(**VERL_GRPO, kl_coef=kl_coef)  # kl_estimator k3 and kl_clamp 10 are the defaults
    same_value_and_gradient(lambda lp, a: rollmill_loss(algo, lp, a, ref=REF),
                            lambda lp, a: verl_loss(lp, a, kl_coef, REF), rollmill_advantages(algo), verl_advantages())
    without_dual_clip = AlgorithmConfig(**{**VERL_GRPO, "dual_clip_c": None}, kl_coef=kl_coef)
    adv = rollmill_advantages(without_dual_clip)
    logp = OLD + SHIFT
    assert not torch.allclose(rollmill_loss(without_dual_clip, logp, adv, ref=REF), verl_loss(logp, adv, kl_coef, REF))


@pytest.mark.parametrize("ours", [TRL_DEFAULT, {**TRL_DEFAULT, "loss_agg": "seq-mean-token-mean", "loss_agg_seq_count": "all"},
                                  {**VERL_GRPO, "kl_coef": 0.001}])
def test_rollmill_loss_is_what_the_trainer_minimizes(ours):
    """The trainer's reported loss for a batch equals `rollmill_loss` on the same log-probs (a single
    pass: old log-probs are the current ones, so the ratio is 1 and the clip settings do not act)."""
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=5)
    ref_model = build_tiny_model(len(tok), seed=6).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    rows = [Row.sampled(torch.randint(3, 90, (3,), generator=g).tolist(), torch.randint(3, 90, (n,), generator=g).tolist(),
                        [-1.0] * n) for n in (5, 2, 0, 4)]
    adv = torch.tensor([0.5, -1.0, 0.3, 1.5])
    batch = build_batch(rows, adv, pad_id=2)
    algo = AlgorithmConfig(**ours)
    trainer = PolicyTrainer(model, TrainConfig(lr=1e-3), algo, max_new_tokens=MAX_LEN,
                            ref_model=ref_model if algo.kl_coef else None)
    with torch.no_grad():
        logp = completion_logprobs(model, batch, 1.0)[0]
        ref = completion_logprobs(ref_model, batch, 1.0)[0]
    expected = rollmill_loss(algo, logp, batch.token_advantages, old=logp, ref=ref, mask=batch.mask)
    assert trainer.step(batch)["loss"] == pytest.approx(float(expected), abs=1e-6)
