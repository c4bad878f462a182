"""Per-token Monte-Carlo estimators of KL(pi_theta || pi_ref) from log-probs of sampled tokens."""

from __future__ import annotations

from typing import Callable

import torch

K3_CLAMP = 10.0


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp (unbiased, high variance, can be negative)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2 (non-negative)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - 1 + (logp - ref), clamped to [-10, 10] as ROLL and verl do."""
    d = logp - ref_logp
    return (torch.exp(-d) - 1 + d).clamp(-K3_CLAMP, K3_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(name: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; allowed: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name](logp, ref_logp)
