"""Advantage estimators over scalar rewards grouped by prompt (shape [P, G]).

Every registry entry maps rewards [P, G] to advantages [P, G], which the trainer broadcasts to the
response tokens. Besides the rewards an estimator may declare keyword inputs, which the caller
(`train.advantage_computer.AdvantageComputer`) passes by name: `eps` (the std epsilon, `algorithm.std_eps`),
`lengths` [P, G] (each response's token count) and `baseline` [P] (each group's greedy reward).
Token-level estimators (GAE, the token form of REINFORCE++) live in `gae.py`. Any KL penalty folded
into the reward is the caller's job, before these run.
"""

from __future__ import annotations

from typing import Callable

import torch

from rollmill.algos.normalize import EPS, normalize_rewards

def group_normalized_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = EPS) -> torch.Tensor:
    """GRPO: (R - mean_group) / (std_group + eps), unbiased std, over each row of `rewards` [P, G].

    A group of one has no spread to learn from: its advantage is 0 (the unbiased std would be NaN).
    With `scale_by_std=False` this is Dr.GRPO's mean-only baseline.
    """
    return normalize_rewards(rewards, "group", "group" if scale_by_std else None, eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: R - mean_group (no std scaling, so no difficulty bias)."""
    return group_normalized_advantages(rewards, scale_by_std=False)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: R_i minus the mean of the other G-1 rewards of its group, = G/(G-1) * (R_i - mean_group).

    A group of one has no other sample to serve as baseline, so its advantage is 0. RLOO folds the
    sequence KL (k1 summed over tokens) into R before the baseline; the caller does that.
    """
    centred = normalize_rewards(rewards, "group", None)
    group = centred.shape[1]
    if group < 2:
        return torch.zeros_like(centred)
    return centred * (group / (group - 1))


def batch_normalized_advantages(rewards: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(R - mean_batch) / (std_batch + eps) over all P*G rewards; a batch of one reward gives 0."""
    return normalize_rewards(rewards, "batch", "batch", eps)


def reinforce_pp_advantages(rewards: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """REINFORCE++ (scalar form): batch mean/std normalization of the rewards, valid for any G.

    The paper's token form (`-beta * k1_t` on every token, R on the last one, discounted returns,
    whitened over all valid tokens of the batch) is `gae.reinforce_pp_token_advantages`, advantage
    `reinforce_pp_token`. Without KL, with gamma 1 and equal lengths it is this function broadcast to
    tokens, up to the ddof of the std (token count instead of sequence count).
    """
    return batch_normalized_advantages(rewards, eps)


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """REINFORCE++-baseline, sequence form: C = R - mean_group, A = C / (std_batch(C) + eps).

    The std is of the *centred* values. verl's token form (whiten the broadcast C over valid tokens)
    differs when lengths differ; get it with `normalize.whiten(dr_grpo_advantages(R) broadcast, mask)`.
    """
    return normalize_rewards(normalize_rewards(rewards, "group", None), None, "batch", eps)


def lite_ppo_advantages(rewards: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Lite PPO: (R - mean_group) / (std_batch(R) + eps), the std taken over the *raw* batch rewards (ROLL)."""
    return normalize_rewards(rewards, "group", "batch", eps)


def opo_advantages(rewards: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """OPO: R_i - b with the length-weighted group baseline b = sum_i |o_i| R_i / sum_i |o_i|.

    The baseline minimizing the gradient variance when each response's squared gradient norm grows
    with its length |o_i| (arXiv 2505.23585). `lengths` [P, G] are the response token counts; None
    weighs every response the same (b is then the group mean, Dr.GRPO). A group whose lengths sum to
    0 uses the plain mean. A group of one has b = R, so its advantage is 0 (verl's OPO gives it R).
    """
    rewards = normalize_rewards(rewards, None, None)  # the shape check and float promotion alone
    weights = torch.ones_like(rewards) if lengths is None else lengths.to(rewards.dtype)
    if weights.shape != rewards.shape:
        raise ValueError(f"lengths must match rewards {tuple(rewards.shape)}, got shape {tuple(weights.shape)}")
    total = weights.sum(dim=1, keepdim=True)
    baseline = torch.where(total > 0, (weights * rewards).sum(dim=1, keepdim=True) / total.clamp(min=1e-12),
                           rewards.mean(dim=1, keepdim=True))
    return rewards - baseline


def remax_advantages(rewards: torch.Tensor, *, baseline: torch.Tensor) -> torch.Tensor:
    """ReMax: R_i - R_greedy, the reward of the greedy response to the same prompt as baseline.

    arXiv 2310.10505. `baseline` [P] holds one greedy (temperature 0) reward per group (row); the
    greedy response is generated and scored with the group but never trained on."""
    rewards = normalize_rewards(rewards, None, None)  # the shape check and float promotion alone
    if baseline.shape != rewards.shape[:1]:
        raise ValueError(f"baseline must be [prompts={rewards.shape[0]}], got shape {tuple(baseline.shape)}")
    return rewards - baseline.to(rewards.dtype)[:, None]


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": group_normalized_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
    "lite_ppo": lite_ppo_advantages,
    "batch": batch_normalized_advantages,
    "opo": opo_advantages,
    "remax": remax_advantages,
}
