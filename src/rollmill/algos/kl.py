"""Per-token Monte-Carlo estimators of KL(pi_theta || pi_ref) from sampled tokens' log-probs (docs/algorithms.md §1.1).

Every estimator is a function of d = logp - ref_logp. `kl_estimate` zeroes d off the mask before any estimator sees
it, so a padded or observation token (whose log-probs may be -inf or garbage) gives exactly 0 and a zero gradient.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Callable

import torch

from rollmill.algos.losses import masked_log_ratio

K3_CLAMP = 10.0


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp (unbiased, high variance, can be negative)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2 (non-negative)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_abs(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """|logp - ref_logp| (verl's "abs"; non-negative, gradient sign(d))."""
    return (logp - ref_logp).abs()


def _k3(d: float) -> float:
    return math.exp(-d) - 1.0 + d


@lru_cache(maxsize=None)
def _k3_domain(clamp: float) -> tuple[float, float]:
    """The interval of d on which k3(d) <= clamp (k3 is convex with its minimum 0 at d = 0), by bisection."""

    def edge(outside: float) -> float:
        inside = 0.0
        for _ in range(200):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if _k3(mid) <= clamp else (inside, mid)
        return inside

    # both start outside: k3(-(ln(c + 2) + 1)) = e(c + 2) - 2 - ln(c + 2) > c, and k3(c + 1) = c + e^-(c+1) > c
    return edge(-(math.log(clamp + 2.0) + 1.0)), edge(clamp + 1.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None = K3_CLAMP) -> torch.Tensor:
    """k3 = exp(ref - logp) - 1 + (logp - ref), at most `clamp` (10, as ROLL and verl; None = unclamped, as TRL).

    d is clamped to the interval where k3(d) <= clamp *before* exp, so k3 keeps its exact value and gradient
    there and is `clamp` with a zero gradient outside; exp never sees a large -d, whose overflow (inf) turned
    the zero gradient of an output clamp into 0 * inf = NaN. Unclamped, a gap above ~88 overflows float32.
    """
    d = logp - ref_logp
    if clamp is None:
        return torch.exp(-d) - 1 + d
    lo, hi = _k3_domain(clamp)
    d = d.clamp(lo, hi)
    return (torch.exp(-d) - 1 + d).clamp(-clamp, clamp)  # only rounding at the domain's edges can exceed it


def _straight_through(value: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """`value` forward, k2's gradient backward: k2 + sg(value - k2)."""
    k2 = kl_k2(logp, ref_logp)
    return k2 + (value - k2).detach()


def kl_k1_plus(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 in value with k2's gradient, d * grad(logp) (verl "k1+"): the gradient of the true KL in expectation."""
    return _straight_through(kl_k1(logp, ref_logp), logp, ref_logp)


def kl_k3_plus(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None = K3_CLAMP) -> torch.Tensor:
    """k3 (clamped as `kl_k3`) in value with k2's gradient, d * grad(logp) (verl "k3+" / "low_var_kl+")."""
    return _straight_through(kl_k3(logp, ref_logp, clamp), logp, ref_logp)


KL_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
    "k1+": kl_k1_plus,
    "k3+": kl_k3_plus,
}


def kl_estimate(
    name: str,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    clamp: float | None = K3_CLAMP,
) -> torch.Tensor:
    """The estimator `name` per token; 0 (value and gradient) where `mask` is 0. `clamp` bounds the estimators
    that take one (k3, k3+; None = unclamped)."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; allowed: {sorted(KL_ESTIMATORS)}")
    fn = KL_ESTIMATORS[name]
    if mask is not None:
        # where(), not a product: -inf * 0 is NaN, and every estimator is 0 at d = 0
        valid = mask > 0
        logp, ref_logp = torch.where(valid, logp, 0.0), torch.where(valid, ref_logp, 0.0)
    kwargs = {"clamp": clamp} if "clamp" in inspect.signature(fn).parameters else {}
    return fn(logp, ref_logp, **kwargs)


def importance_weighted_kl(
    kl: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TRL's bias-corrected KL loss term (GRPOConfig.use_bias_correction_kl, DeepSeek-V3.2): k * r with
    r = exp(logp - old_logp), not detached as in TRL, so the gradient gains k * r * grad(logp). Off the mask
    r = 1; the log-ratio is clamped like the losses' (`masked_log_ratio`)."""
    return kl * torch.exp(masked_log_ratio(logp, old_logp, mask))


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
