"""Advantage estimators over scalar rewards grouped by prompt (shape [P, G]).

Every registry entry maps rewards [P, G] to advantages [P, G], which the trainer broadcasts to the
response tokens. Token-level estimators (GAE, the token form of REINFORCE++) live in `gae.py` and
`normalize.whiten`. Any KL penalty folded into the reward is the caller's job, before these run.
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

    The paper's token form puts `-beta * k1_t` on every token and R on the last one
    (`gae.token_rewards_from_outcome`), sums to returns (`gae.gae_advantages` with zero values and
    lam=1) and whitens over all valid tokens of the batch (`normalize.whiten`). The per-token KL is
    applied by the caller that way; without it and with equal lengths the token form is this function
    broadcast to tokens, up to the ddof of the std (token count instead of sequence count).
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


ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grpo": group_normalized_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
    "lite_ppo": lite_ppo_advantages,
    "batch": batch_normalized_advantages,
}
