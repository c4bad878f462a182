"""Per-token policy-gradient losses. Each returns the token loss matrix; aggregation is separate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PolicyLossOutput:
    token_loss: torch.Tensor  # [B, L], unmasked
    clipped: torch.Tensor  # [B, L] bool: the clipped branch was the active one
    ratio: torch.Tensor  # [B, L]


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> PolicyLossOutput:
    """PPO clip: l = -min(r*A, clip(r, 1-eps, 1+eps_high)*A) with r = exp(logp - old_logp).

    `advantages` broadcasts against [B, L] (pass [B, 1] for sequence-level advantages).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    token_loss = -torch.minimum(unclipped, clipped)
    return PolicyLossOutput(token_loss=token_loss, clipped=clipped < unclipped, ratio=ratio)


POLICY_LOSSES: dict[str, Callable[..., PolicyLossOutput]] = {
    "ppo_clip": ppo_clip_loss,
}
