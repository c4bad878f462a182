"""Policy losses that replace PPO's hard token clip (docs/algorithms.md §2.15-2.17): SAPO's soft gate, GPG's plain
policy gradient (no ratio, no clip) and GMPO's geometric mean of token ratios; plus GPG's loss scale alpha.

Same interface as `rollmill.algos.losses` (its module docstring); importing this module registers the losses in
`POLICY_LOSSES` (`rollmill.algos` does).
"""

from __future__ import annotations

import torch

from rollmill.algos.losses import POLICY_LOSSES, PolicyLossOutput, _seq_log_ratio, _valid, masked_log_ratio


def sapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> PolicyLossOutput:
    """SAPO (§2.15): l = -f(r) * A, a soft gate f(r) = (4/tau) * sigmoid(tau * (r - 1)) in place of the clip.

    r = exp(logp - old_logp); tau = tau_pos where A > 0 and tau_neg elsewhere (paper and verl defaults 1.0 / 1.05).
    The gate's slope 4 * sigma * (1 - sigma) is 1 at r = 1, so on-policy tokens get GRPO's gradient; it decays
    smoothly as r leaves 1 instead of dropping to 0 at a clip edge. Nothing is clipped: `clipped` is all False.
    """
    ratio = torch.exp(masked_log_ratio(logp, old_logp, mask))
    tau = torch.where(advantages > 0, sapo_tau_pos, sapo_tau_neg).to(ratio.dtype)
    gate = 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))
    unclipped = torch.zeros_like(ratio, dtype=torch.bool)
    return PolicyLossOutput(token_loss=-gate * advantages, clipped=unclipped, ratio=ratio)


def gpg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """GPG (§2.16): l = -A * logp, the plain policy gradient: no ratio, no clip (`old_logp` only reports `ratio`).

    GPG's alpha = B / (B - M) is a scale on the whole loss, not part of the token loss (`gpg_alpha`, applied by the
    trainer with `algorithm.gpg_rescale`).
    """
    ratio = torch.exp(masked_log_ratio(logp.detach(), old_logp, mask))
    unclipped = torch.zeros_like(ratio, dtype=torch.bool)
    return PolicyLossOutput(token_loss=-advantages * logp, clipped=unclipped, ratio=ratio)


def gmpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gmpo_log_clip_low: float = 0.4,
    gmpo_log_clip_high: float = 0.4,
) -> PolicyLossOutput:
    """GMPO (§2.17): l_i = -A_i * (geometric mean of the row's token ratios, each clipped for the sign of A_i).

    In log space: l_i = -A_i * exp(masked mean_t x_t), x_t = sign * min(sign * d_t, sign * clip(d_t, -low, high)),
    d_t = logp_t - old_logp_t, sign = +1 where A_i >= 0 (the upper bound acts) and -1 elsewhere (the lower one),
    as the authors' code. The default bounds are the paper's ratio range (e^-0.4, e^0.4). A_i is the masked mean
    of the row's advantages (as verl; the paper's are per sequence). l_i is broadcast to the row's tokens like
    GSPO's, so seq-mean-token-mean gives the paper's (1/G) sum_i. `clipped` marks the tokens a bound changed.
    """
    seq_adv = _seq_log_ratio(advantages.expand_as(logp), mask, mean=True)  # a masked row mean
    sign = torch.where(seq_adv >= 0, 1.0, -1.0).to(logp.dtype)
    log_ratio = masked_log_ratio(logp, old_logp, mask)
    bounded = log_ratio.clamp(-gmpo_log_clip_low, gmpo_log_clip_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * bounded)
    ratio = torch.exp(_seq_log_ratio(pessimistic, mask, mean=True)).expand_as(logp)
    clipped = (sign * log_ratio > sign * bounded) & (_valid(mask, logp) > 0)
    return PolicyLossOutput(token_loss=-seq_adv * ratio, clipped=clipped, ratio=ratio)


def valid_rows(advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """Rows with a non-zero advantage on at least one valid token: B - M in GPG's alpha."""
    return float(((advantages != 0) & (mask > 0)).any(-1).sum())


def gpg_alpha(valid: float, rows: float, min_valid_fraction: float = 0.05) -> float:
    """GPG's accurate-gradient-estimation scale alpha = B / (B - M) = rows / valid, at most 1 / min_valid_fraction.

    M counts rows that carry no gradient (a group whose rewards are all equal has advantage 0); scaling the
    loss by alpha makes its gradient the mean over the rows that do. The cap is the authors' code's
    (`loss / max(1 - invalid_fraction, 0.05)`); the paper states alpha without one.
    """
    return 1.0 / max(valid / max(rows, 1.0), min_valid_fraction)


POLICY_LOSSES.update({"sapo": sapo_loss, "gpg": gpg_loss, "gmpo": gmpo_loss})
