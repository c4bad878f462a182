"""Preplan-and-anchor credit (docs/algorithms.md §4.5, 2510.13554), as pure functions over attention maps.

`attn[..., t, s]` is the causal attention of row (query) `t` to column (key) `s <= t`, e.g. from an extra
no-grad eager forward of the rollout. WAAD marks *preplan* tokens (long look-back), FAI marks *anchor*
tokens (attended to by what follows); a top-q gate on either becomes a token-level advantage amplifier.
κ, q, W, the head selection rule and the sign handling are UNVERIFIED in the spec: keep them configurable.
"""

from __future__ import annotations

import torch

ANCHOR_MODES = ("waad", "fai", "preplan_anchor")


def _as_float(attn: torch.Tensor) -> torch.Tensor:
    # Attention maps often come out of the model in bf16; sums over L keys need float32 at least.
    return attn.to(torch.promote_types(attn.dtype, torch.float32))


def waad(attn: torch.Tensor, window: int) -> torch.Tensor:
    """Windowed average attention distance [..., L]: WAAD_t = Σ_{s≤t} A[t,s]·min(t−s, W).

    Leading dims (batch, heads) pass through. Keys after the query (s > t) get distance 0, so a
    non-causal map does not leak future attention into the score."""
    attn = _as_float(attn)
    pos = torch.arange(attn.shape[-1], device=attn.device)
    dist = (pos[:, None] - pos[None, :]).clamp(0, window).to(attn.dtype)
    return (attn * dist).sum(-1)


def fai(attn: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Future attention influence [..., L]: FAI_s = mean over later valid rows t > s of A[t,s].

    `valid` ([..., L], bool or 0/1, broadcastable against attn's leading dims) marks the rows that may
    vote; None means all rows. A position with no later valid row (the last token, or one followed only
    by padding) gets 0 rather than NaN."""
    attn = _as_float(attn)
    L = attn.shape[-1]
    weight = torch.ones(L, L, dtype=attn.dtype, device=attn.device).tril(-1)  # weight[t, s] = 1 iff t > s
    if valid is not None:
        weight = weight * valid.to(attn.dtype)[..., :, None]
    count = weight.sum(-2)
    return (attn * weight).sum(-2) / count.clamp(min=1)


def split_heads_by_distance(attn: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split heads into (local [H], global_ [H]) bool masks by mean backward attention distance.

    UNVERIFIED rule (the spec leaves head selection open): each head's distance is Σ_s A[t,s]·(t−s),
    averaged over the valid rows of the whole batch (`attn` [B, H, L, L], `valid` [B, L]). Heads at or
    below the median (lower median for an even H) are local, heads above it are global. When that
    leaves one side empty (a single head, or all heads tied) every head serves as both, so neither
    metric is ever averaged over zero heads."""
    attn = _as_float(attn)
    pos = torch.arange(attn.shape[-1], device=attn.device)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).to(attn.dtype)
    row_dist = (attn * dist).sum(-1)  # [B, H, L]
    rows = valid.to(attn.dtype)[:, None, :]
    head_dist = (row_dist * rows).sum((0, 2)) / rows.sum().clamp(min=1)
    local = head_dist <= head_dist.median()
    if local.all():
        return local, local.clone()
    return local, ~local


def top_fraction_gate(scores: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Float 0/1 gate [B, L]: per row, 1 on the ceil(q·n_valid) highest-scoring valid positions.

    Ties go to the earliest position. Masked positions, and rows with no valid position, are 0."""
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    mask = mask.bool()
    # Stable sorts keep position order among equal keys: first by score, then valid positions ahead of
    # masked ones, so a masked position can never take a slot even if its score is high or tied.
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_valid = torch.sort(mask.gather(-1, by_score).to(torch.uint8), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, by_valid)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    n_valid = mask.sum(-1, keepdim=True)
    # The small slack stops float error from rounding an exact product up (0.07·100 = 7.000000000000001).
    k = torch.ceil(q * n_valid.double() - 1e-9).clamp(min=1)
    return ((rank < k) & mask).to(torch.float32)


def amplify_advantages(
    adv: torch.Tensor, gate: torch.Tensor, kappa: float, positive_only: bool = False
) -> torch.Tensor:
    """Token advantages [B, L]: Â_t = A_t·(1 + κ·g_t), with `adv` [B] (broadcast over tokens) or [B, L].

    By default both signs are amplified (a gated token gets more credit and more blame); with
    `positive_only` only tokens with A > 0 are. Which one the paper does is UNVERIFIED."""
    if adv.dim() == 1:
        adv = adv[:, None]
    factor = 1 + kappa * gate
    if positive_only:
        factor = torch.where(adv > 0, factor, torch.ones_like(factor))
    return adv * factor


def anchor_credit_gate(
    attn: torch.Tensor, valid: torch.Tensor, region: slice, mode: str, window: int, q: float
) -> torch.Tensor:
    """Gate [B, len(region)] for amplify_advantages, from attention `attn` [B, H, L, L] and `valid` [B, L].

    Metrics are computed on the full sequence (prompt + completion), since a completion token's FAI comes
    from the rows after it; they are then sliced to `region` (the completion columns) and the top-q
    selection runs within the region, masked by `valid[:, region]`. Modes: "waad" gates on WAAD averaged
    over local heads (preplan tokens); "fai" gates on FAI averaged over global heads (anchor tokens);
    "preplan_anchor" takes the elementwise max of both gates, i.e. credits either kind of token; that
    shape of the paper's coupled strategy is UNVERIFIED."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"unknown anchor mode {mode!r}; expected one of {ANCHOR_MODES}")
    local, global_ = split_heads_by_distance(attn, valid)
    region_mask = valid[:, region]
    gates = []
    if mode in ("waad", "preplan_anchor"):
        score = waad(attn[:, local], window).mean(1)
        gates.append(top_fraction_gate(score[:, region], region_mask, q))
    if mode in ("fai", "preplan_anchor"):
        score = fai(attn[:, global_], valid[:, None, :]).mean(1)
        gates.append(top_fraction_gate(score[:, region], region_mask, q))
    return gates[0] if len(gates) == 1 else torch.maximum(gates[0], gates[1])
