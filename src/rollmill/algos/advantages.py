"""Advantage estimators over scalar rewards grouped by prompt (shape [P, G])."""

from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-6


def group_normalized_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = EPS) -> torch.Tensor:
    """GRPO: (R - mean_group) / (std_group + eps), unbiased std, over each row of `rewards` [P, G].

    A group of one has no spread to learn from: its advantage is 0 (the unbiased std would be NaN).
    With `scale_by_std=False` this is Dr.GRPO's mean-only baseline.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float32)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: R - mean_group (no std scaling, so no difficulty bias)."""
    return group_normalized_advantages(rewards, scale_by_std=False)


ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grpo": group_normalized_advantages,
    "dr_grpo": dr_grpo_advantages,
}
