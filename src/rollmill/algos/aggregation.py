"""Reduce a token loss matrix [B, L] with a mask to a scalar (the modes of docs/algorithms.md §1.4).

Micro-batched training passes the *global* mini-batch denominators (`num_tokens`, `num_seqs`) so
that accumulating micro-batch losses gives exactly the loss of the whole mini-batch. Every mode is the
masked token sum divided by a product of denominators, so the loss is linear in 1/denominator: the
streamed update aggregates with denominators 1 and scales the summed gradients once at the end.
"""

from __future__ import annotations

import torch

SEQ_COUNTS = ("nonempty", "all")


def _safe(x: torch.Tensor | float) -> torch.Tensor | float:
    return max(x, 1) if isinstance(x, (int, float)) else x.clamp(min=1)


def count_seqs(mask: torch.Tensor, seq_count: str = "nonempty") -> float:
    """N: the rows with at least one valid token ("nonempty": ROLL, verl) or every row ("all": TRL)."""
    if seq_count == "nonempty":
        return float((mask.sum(dim=-1) > 0).sum())
    if seq_count == "all":
        return float(mask.shape[0])
    raise ValueError(f"unknown seq_count {seq_count!r}; allowed: {list(SEQ_COUNTS)}")


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_length: float | None = None,
    seq_count: str = "nonempty",
    norm_by_seqs: bool = False,
) -> torch.Tensor:
    """Aggregate `loss` [B, L] over positions where `mask` is 1.

    token-mean: sum(m*l) / num_tokens. token-sum: sum(m*l). seq-mean-token-sum: sum_i sum_t m*l / N.
    seq-mean-token-mean: sum_i mean_t(m*l) / N. seq-mean-token-sum-norm: sum(m*l) / norm_length, and also / N
    with `norm_by_seqs`. N (`num_seqs`, else counted per `seq_count`) counts rows with a valid token or every
    row; norm_length defaults to the mask's width. Masked positions never reach the sum (a non-finite value
    there is dropped, not multiplied by 0); zero valid tokens give a loss of exactly 0.
    """
    mask = mask.to(loss.dtype)
    masked = torch.where(mask > 0, loss * mask, torch.zeros_like(loss))
    if num_seqs is None:
        num_seqs = count_seqs(mask, seq_count)
    if mode == "token-mean":
        denom = float(mask.sum()) if num_tokens is None else num_tokens
        return masked.sum() / _safe(denom)
    if mode == "token-sum":
        return masked.sum()
    if mode == "seq-mean-token-sum":
        return masked.sum() / _safe(num_seqs)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return per_seq.sum() / _safe(num_seqs)
    if mode == "seq-mean-token-sum-norm":
        length = _safe(float(norm_length if norm_length is not None else loss.shape[-1]))
        return masked.sum() / (length * _safe(num_seqs) if norm_by_seqs else length)
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {list(LOSS_AGGREGATIONS)}")


LOSS_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
