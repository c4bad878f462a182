"""Per-token policy-gradient losses (docs/algorithms.md §2, §3.1) and train/inference IS helpers (§3.2).

Every loss is `fn(logp, old_logp, advantages, mask=None, *, <its params>) -> PolicyLossOutput`:
`logp` [B, L] carries the gradient, `old_logp` [B, L] is the detached policy the ratio is taken
against, `advantages` broadcasts to [B, L] ([B, 1] for sequence-level), `mask` [B, L] is 1 on
response tokens (None = all valid). The token loss is returned unmasked; aggregation (§1.4) is
separate. The keyword-only params are a loss's whole configuration surface (`loss_param_names`),
so callers pass exactly those and a misspelt one is a TypeError, never silently dropped. Every ratio
is exponentiated from `masked_log_ratio`, so padding and huge gaps never make a NaN gradient (§0).
`rollmill.algos.clip_alternatives` registers SAPO, GPG and GMPO in `POLICY_LOSSES` too.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PolicyLossOutput:
    token_loss: torch.Tensor  # [B, L], unmasked
    clipped: torch.Tensor  # [B, L] bool: a clip, cap, taper or drop changed this token's update
    ratio: torch.Tensor  # [B, L] the importance ratio the loss used (sequence losses broadcast theirs)


LOG_RATIO_CLAMP = 20.0


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if mask is None else mask.to(like.dtype)


def masked_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log(pi / pi_old) = logp - old_logp, clamped to +-LOG_RATIO_CLAMP (verl's bound), and 0 where `mask` is 0.

    Every ratio a loss exponentiates comes from here. A padded or observation token's log-prob may be -inf
    (its difference NaN) and a real token's gap can pass float32's exp range (~88): either made the ratio inf
    and its gradient 0 * inf = NaN, even where a clip or the mask then discarded the value. Beyond a ratio of
    e^20 the value is capped and the gradient is 0.
    """
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # where(), not a product: NaN * 0 is NaN
    return log_ratio if mask is None else torch.where(mask > 0, log_ratio, torch.zeros_like(log_ratio))


def _seq_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """Masked sum (mean=False) or mean of a token log-ratio per sequence, [B, 1]; an empty row gives 0."""
    m = _valid(mask, log_ratio)
    # where(), not a product: a non-finite value at a padded position must not reach the row's sum
    total = torch.where(m > 0, log_ratio, torch.zeros_like(log_ratio)).sum(-1, keepdim=True)
    return total / m.sum(-1, keepdim=True).clamp(min=1) if mean else total


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float, dual_clip_c: float | None = None
) -> PolicyLossOutput:
    """-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A), and with dual clip -max(that, c*A) where A < 0."""
    unclipped = ratio * advantages
    surrogate = torch.minimum(unclipped, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)
    clipped = surrogate < unclipped
    if dual_clip_c is not None:
        floor = dual_clip_c * advantages
        dual = (advantages < 0) & (floor > surrogate)
        surrogate = torch.where(dual, floor, surrogate)
        clipped = clipped | dual
    return PolicyLossOutput(token_loss=-surrogate, clipped=clipped.expand_as(ratio), ratio=ratio)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
) -> PolicyLossOutput:
    """PPO clip (§2.1): l = -min(r*A, clip(r, 1-eps, 1+eps_high)*A), r = exp(logp - old_logp).

    `clip_eps_high` (clip-higher, §2.3) defaults to `clip_eps`. `dual_clip_c` (§2.2; paper 3.0,
    ROLL 1 + 2*clip_eps; None = off) bounds tokens with A < 0: l = -max(min(...), c*A). Tokens are
    independent, so `mask` only keeps padding out of the exponent.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(masked_log_ratio(logp, old_logp, mask))
    return _clipped_surrogate(ratio, advantages, clip_eps, high, dual_clip_c)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gspo_eps_low: float = 3e-4,
    gspo_eps_high: float = 4e-4,
) -> PolicyLossOutput:
    """GSPO (§2.8): one ratio per sequence, s_i = exp(masked mean_t(logp - old_logp)), PPO-clipped
    with GSPO's own narrow range and broadcast to the sequence's tokens.

    With seq-mean-token-mean aggregation this is the paper's (1/G) sum_i. The clip decision is per
    sequence, so `clipped` marks all tokens of a clipped sequence. An empty response gets s = 1.
    """
    ratio = torch.exp(_seq_log_ratio(masked_log_ratio(logp, old_logp, mask), mask, mean=True)).expand_as(logp)
    return _clipped_surrogate(ratio, advantages, gspo_eps_low, gspo_eps_high)


def gspo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gspo_eps_low: float = 3e-4,
    gspo_eps_high: float = 4e-4,
) -> PolicyLossOutput:
    """GSPO-token (§2.8): s_it = sg(s_i) * exp(logp_t - sg(logp_t)), clipped like `gspo_loss`.

    Same value as GSPO, but each token's gradient is -A_t * s_i on its own log-prob, so token-level
    advantages can be used; with A_t = A_i and seq-mean-token-mean it equals GSPO's gradient.
    """
    log_ratio = masked_log_ratio(logp, old_logp, mask)
    seq = torch.exp(_seq_log_ratio(log_ratio, mask, mean=True)).detach()
    ratio = seq * torch.exp(log_ratio - log_ratio.detach())
    return _clipped_surrogate(ratio, advantages, gspo_eps_low, gspo_eps_high)


def topr_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    topr_ratio_level: str = "seq",
    topr_positive_weight: float = 1.0,
    topr_negative_weight: float = 1.0,
) -> PolicyLossOutput:
    """TOPR (§2.9): l = -w * A * logp; w = positive weight where A > 0, and negative weight *
    sg(clip(pi/mu, 0, 1)) where A <= 0, pi/mu = exp(logp - old_logp) per token (`"token"`, ROLL) or
    its product over the sequence (`"seq"`, paper).

    The advantage stands in for the paper's reward (as in ROLL): the loss never sees rewards. `ratio`
    reports the token ratio at both levels, since a sequence's product can overflow.
    """
    log_ratio = masked_log_ratio(logp.detach(), old_logp, mask)
    if topr_ratio_level == "seq":
        level = _seq_log_ratio(log_ratio, mask, mean=False)
    elif topr_ratio_level == "token":
        level = log_ratio
    else:
        raise ValueError(f"topr_ratio_level must be 'seq' or 'token', got {topr_ratio_level!r}")
    positive = advantages > 0
    # exp(min(x, 0)) is clip(exp(x), 0, 1) without overflow for long sequences
    taper = torch.exp(level.clamp(max=0.0))
    weight = torch.where(positive, topr_positive_weight, topr_negative_weight * taper)
    clipped = (~positive & (level > 0)).expand_as(logp)
    return PolicyLossOutput(token_loss=-weight * advantages * logp, clipped=clipped, ratio=torch.exp(log_ratio))


def raft_pp_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_eps: float = 0.2,
) -> PolicyLossOutput:
    """RAFT++ (§2.10): l = -min(r, clip(r, 1-eps, 1+eps)) on positive samples, 0 on the rest.

    The loss sees advantages, not rewards, so "positive" means A > 0: with the raw 0/1 reward as the
    advantage that is the paper's 1[R = 1]; with group-normalised advantages it keeps above-mean
    samples and drops all-correct groups (A = 0). The advantage's size does not scale the loss.
    """
    keep = advantages > 0
    ratio = torch.exp(masked_log_ratio(logp, old_logp, mask))
    surrogate = torch.minimum(ratio, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    token_loss = torch.where(keep, -surrogate, torch.zeros_like(surrogate))
    return PolicyLossOutput(token_loss=token_loss, clipped=keep & (ratio > 1.0 + clip_eps), ratio=ratio)


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cispo_eps_low: float = 0.1,
    cispo_eps_high: float = 0.1,
    cispo_unified_mask: bool = False,
) -> PolicyLossOutput:
    """CISPO (§2.11): l = -sg(clip(r, 1-eps_low, 1+eps_high)) * A * logp (ROLL defaults 0.1/0.1).

    The clip caps a token's weight and never zeroes its gradient; eps_low = 1 removes the lower bound
    (MiniMax-M1), and eps_low = 1, eps_high = 0 is ROLL's pg_variant "tis" (§3.2 b). With
    `cispo_unified_mask` tokens with (A > 0, r > 1+eps_high) or (A < 0, r < 1-eps_low) are dropped.
    """
    ratio = torch.exp(masked_log_ratio(logp, old_logp, mask)).detach()
    low, high = 1.0 - cispo_eps_low, 1.0 + cispo_eps_high
    weight = ratio.clamp(low, high)
    out_of_range = (ratio < low) | (ratio > high)
    if cispo_unified_mask:
        drop = ((advantages > 0) & (ratio > high)) | ((advantages < 0) & (ratio < low))
        weight = torch.where(drop, torch.zeros_like(weight), weight)
    return PolicyLossOutput(token_loss=-weight * advantages * logp, clipped=out_of_range, ratio=ratio)


def decoupled_ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    behaviour_logp: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    is_weight_cap: float = 1.2,
) -> PolicyLossOutput:
    """Decoupled PPO (§3.1): l = w * ppo_clip(logp vs old_logp), w = sg(min(exp(old_logp - behaviour_logp), C)).

    `old_logp` is the *proximal* policy (recomputed by the trainer with the weights at the start of
    the update) and anchors the trust region; `behaviour_logp` are the sampler's log-probs, whose
    staleness or train/inference mismatch the capped weight corrects. `clipped` is PPO's clip only.
    """
    out = ppo_clip_loss(
        logp, old_logp, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c
    )
    # exp(min(x, log C)) == min(exp(x), C) without overflow
    weight = torch.exp(masked_log_ratio(old_logp, behaviour_logp, mask).clamp(max=math.log(is_weight_cap))).detach()
    return PolicyLossOutput(token_loss=weight * out.token_loss, clipped=out.clipped, ratio=out.ratio)


POLICY_LOSSES: dict[str, Callable[..., PolicyLossOutput]] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "topr": topr_loss,
    "raft_pp": raft_pp_loss,
    "cispo": cispo_loss,
    "decoupled_ppo": decoupled_ppo_loss,
}


def loss_param_names(fn: Callable[..., PolicyLossOutput]) -> tuple[str, ...]:
    """The keyword-only parameters of a loss: everything a caller may (and should) configure."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _log_ratio_at_level(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """token: the token log-ratio; sequence: its masked sum (product of ratios); geometric: masked mean."""
    if level == "token":
        return log_ratio
    if level in ("sequence", "geometric"):
        return _seq_log_ratio(log_ratio, mask, mean=level == "geometric")
    raise ValueError(f"level must be 'token', 'sequence' or 'geometric', got {level!r}")


def tis_weights(
    logp_train: torch.Tensor, logp_behaviour: torch.Tensor, mask: torch.Tensor, cap: float, level: str = "token"
) -> torch.Tensor:
    """Truncated IS weights (§3.2 a), detached: min(pi_train / pi_behaviour, cap) at `level`.

    The ratio is per token, per sequence (product) or geometric (per-sequence geometric mean),
    broadcast to [B, L]; padded positions get 0. Multiply the token loss by it.
    """
    m = _valid(mask, logp_train)
    log_ratio = _log_ratio_at_level(masked_log_ratio(logp_train, logp_behaviour, m).detach(), m, level)
    return torch.exp(log_ratio.clamp(max=math.log(cap))).expand_as(m) * m


def mismatch_mask(
    logp_train: torch.Tensor,
    logp_behaviour: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    ratio_bounds: tuple[float, float] | None = (0.8, 1.2),
    diff_bounds: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Train/inference mismatch filter (§3.2 a): `mask` with out-of-range tokens or sequences zeroed.

    Keeps where lo <= ratio <= hi, the ratio taken at `level` as in `tis_weights`, and (if
    `diff_bounds`) where lo <= pi_train - pi_behaviour <= hi per token. At sequence levels a
    sequence is the unit: one out-of-range token drops it. None disables a filter.
    """
    m = _valid(mask, logp_train)
    log_ratio = masked_log_ratio(logp_train, logp_behaviour, m).detach()
    keep = torch.ones_like(m, dtype=torch.bool)
    if ratio_bounds is not None:
        ratio = torch.exp(_log_ratio_at_level(log_ratio, m, level))
        keep = keep & (ratio >= ratio_bounds[0]) & (ratio <= ratio_bounds[1])
    if diff_bounds is not None:
        diff = (logp_train.exp() - logp_behaviour.exp()).detach()
        ok = ((diff >= diff_bounds[0]) & (diff <= diff_bounds[1])) | (m == 0)  # padding never vetoes a sequence
        keep = keep & (ok if level == "token" else ok.all(-1, keepdim=True))
    return m * keep
