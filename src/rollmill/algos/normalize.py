"""Composable reward/advantage normalization (docs/algorithms.md §1.3) and its optional post-steps.

`normalize_rewards` turns scalar rewards [P, G] into `(R - mu) / (sigma + eps)` with mu and sigma each
chosen from None | "group" | "batch" | "running"; every named preset (GRPO, batch, Lite PPO, ...) is one
pair of choices. Standard deviations are unbiased (ddof=1) throughout, as the spec's conventions ask.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6
NORM_TYPES = (None, "group", "batch", "running")


class RunningMoments:
    """Running mean and variance of every value seen so far, merged batch by batch (Chan/Welford).

    Kept in Python floats (float64) so that long runs do not drift; `var` is the population variance,
    `std` the unbiased one (0 until two values have been seen, since it is undefined before).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: torch.Tensor) -> None:
        """Fold every element of `values` into the running moments."""
        flat = values.detach().to(torch.float64).flatten()
        n = flat.numel()
        if n == 0:
            return
        batch_mean = float(flat.mean())
        batch_m2 = float(((flat - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        # Chan et al.'s pairwise merge: exact for any batch sizes, no catastrophic cancellation.
        self._m2 += batch_m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def var(self) -> float:
        """Population variance (ddof=0) of all values seen; 0 before any."""
        return self._m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation (ddof=1); 0 while fewer than two values were seen."""
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 0.0

    def state_dict(self) -> dict:
        """Plain-float state for checkpoints."""
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        """Restore the moments written by `state_dict`."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self._m2 = float(state["m2"])


def _float(x: torch.Tensor) -> torch.Tensor:
    # Integer and half-precision rewards are computed in float32; float64 stays float64 (gradcheck).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _moments(rewards: torch.Tensor, kind: str, running: RunningMoments | None) -> tuple:
    """(mean, std, n) of `kind`, broadcastable against [P, G]; n is the count the std was taken over."""
    if kind == "group":
        n = rewards.shape[1]
        std = rewards.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(rewards[:, :1])
        return rewards.mean(dim=1, keepdim=True), std, n
    if kind == "batch":
        n = rewards.numel()
        std = rewards.std() if n > 1 else rewards.new_zeros(())
        return rewards.mean(), std, n
    assert running is not None  # checked by the caller
    return rewards.new_tensor(running.mean), rewards.new_tensor(running.std), running.count


def normalize_rewards(
    rewards: torch.Tensor,
    mean_type: str | None,
    std_type: str | None,
    eps: float = EPS,
    running: RunningMoments | None = None,
) -> torch.Tensor:
    """Return `(R - mu) / (sigma + eps)` (or `R - mu` when `std_type` is None) for rewards [P, G].

    group statistics are per prompt (row), batch statistics over all P*G rewards, running ones come
    from `running`, which is first updated with this batch (ROLL's order, so the first batch is not
    scaled by an empty history). mu is 0 for `mean_type=None`. Where the std is undefined (a group of
    one, a batch or history of a single reward) the result is 0: the unbiased std would be NaN and there
    is no spread to learn from. A zero std with n >= 2 is kept and only eps keeps it finite, as the spec
    says; with matching mean and std types the numerator is then 0 too.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    for kind in (mean_type, std_type):
        if kind not in NORM_TYPES:
            raise ValueError(f"unknown normalization type {kind!r}; allowed: {list(NORM_TYPES)}")
    rewards = _float(rewards)
    if "running" in (mean_type, std_type):
        if running is None:
            raise ValueError("mean_type/std_type 'running' needs a RunningMoments instance")
        running.update(rewards)
    centred = rewards
    if mean_type is not None:
        centred = rewards - _moments(rewards, mean_type, running)[0]
    if std_type is None:
        return centred
    _, std, n = _moments(rewards, std_type, running)
    if n < 2:
        return torch.zeros_like(rewards)
    return centred / (std + eps)


def decoupled_group_scores(terms: torch.Tensor, weights: list[float], eps: float = EPS) -> torch.Tensor:
    """GDPO's decoupled normalization: `sum_k w_k * (r_k - mu_group(r_k)) / (sigma_group(r_k) + eps)`.

    `terms` [K, P, G] holds each of the K reward functions' raw values, `weights` their K weights;
    the result [P, G] replaces the weighted sum `sum_k w_k * r_k`. Each function is normalized within
    each prompt's group on its own, so a function with a small range is not drowned by one with a
    large range. A function constant over a group adds 0 there; a group of one gets 0 (the group std
    is undefined), as in `normalize_rewards`.
    """
    if terms.dim() != 3 or terms.shape[0] != len(weights):
        raise ValueError(f"terms must be [functions={len(weights)}, prompts, group], got shape {tuple(terms.shape)}")
    return sum(w * normalize_rewards(t, "group", "group", eps) for w, t in zip(weights, terms))


def _clamp_abs(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    if bound is None:
        return x
    if bound <= 0:
        raise ValueError(f"clip bound must be positive, got {bound}")
    return x.clamp(-bound, bound)


def reward_clip(rewards: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Clamp rewards to [-bound, bound] before normalization; `bound=None` leaves them unchanged."""
    return _clamp_abs(rewards, bound)


def advantage_clip(advantages: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Clamp advantages to [-bound, bound] after normalization/whitening; `None` leaves them unchanged."""
    return _clamp_abs(advantages, bound)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Masked whitening over all valid tokens: `(v - mean) / (std + eps)`, unbiased std, masked out -> 0.

    The statistics are token-weighted (every valid token counts once, so long responses weigh more).
    With one or no valid token there is no spread to whiten by, so the input is returned unchanged.
    """
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count <= 1:
        return values
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / (count - 1)
    return (values - mean) / (var.sqrt() + eps) * mask
