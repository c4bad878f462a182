"""Reduce a token loss matrix [B, L] with a mask to a scalar (the four modes of docs/algorithms.md §1.4).

Micro-batched training passes the *global* mini-batch denominators (`num_tokens`, `num_seqs`) so
that accumulating micro-batch losses gives exactly the loss of the whole mini-batch.
"""

from __future__ import annotations

import torch


def _safe(x: torch.Tensor | float) -> torch.Tensor | float:
    return max(x, 1) if isinstance(x, (int, float)) else x.clamp(min=1)


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Aggregate `loss` [B, L] over positions where `mask` is 1.

    token-mean: sum(m*l) / num_tokens. seq-mean-token-sum: sum_i sum_t m*l / N.
    seq-mean-token-mean: sum_i mean_t(m*l) / N. seq-mean-token-sum-norm: sum(m*l) / norm_length.
    N counts sequences with at least one valid token; a fully masked row contributes 0, and zero
    valid tokens give a loss of exactly 0.
    """
    mask = mask.to(loss.dtype)
    masked = loss * mask
    seq_tokens = mask.sum(dim=-1)
    if num_seqs is None:
        num_seqs = float((seq_tokens > 0).sum())
    if mode == "token-mean":
        denom = float(mask.sum()) if num_tokens is None else num_tokens
        return masked.sum() / _safe(denom)
    if mode == "seq-mean-token-sum":
        return masked.sum() / _safe(num_seqs)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / seq_tokens.clamp(min=1)
        return per_seq.sum() / _safe(num_seqs)
    if mode == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else loss.shape[-1]
        return masked.sum() / _safe(float(length))
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {list(LOSS_AGGREGATIONS)}")


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
