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


class AdaptiveKLController:
    """Reward-side KL coefficient beta (Ziegler et al.; ROLL's AdaptiveKLController, §1.2).

    `update` moves beta toward the KL target: e = clip(KL/target - 1, -0.2, 0.2) and
    beta <- beta * (1 + e * n_steps / horizon); the clip bounds how fast beta can move on one noisy
    batch. With `target=None` beta stays at `init_coef`.
    """

    def __init__(self, init_coef: float = 0.2, target: float | None = None, horizon: float = 10000) -> None:
        if target is not None and target <= 0:
            raise ValueError(f"KL target must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be positive, got {horizon}")
        self.value = float(init_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt beta after a batch of `n_steps` samples whose KL was `current_kl`.

        `current_kl` is the batch mean of each sequence's masked-mean KL, i.e.
        `aggregate_loss(kl, mask, "seq-mean-token-mean")`.
        """
        if self.target is None:
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """The current beta; target and horizon come from the config."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore beta written by `state_dict`."""
        self.value = float(state["value"])
