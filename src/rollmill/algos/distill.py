"""Distillation math (docs/distill.md): per-token divergences between a teacher's and a student's
next-token distributions, and DDK's domain-weight update.

Every divergence takes logits `[T, V]`, one row per reply position (both models read the same
context there), and returns one value per position `[T]`; masking and averaging are the caller's.
All of them are computed in at least float32, whatever dtype the logits come in.
"""

from __future__ import annotations

import torch


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(P || Q) = sum_v p(v) (log p(v) - log q(v)) at each position, over the whole vocabulary.

    `token_kl(student, teacher)` is the reverse KL on-policy distillation minimises; `token_kl(teacher,
    student)` is the forward KL the held-out metrics and DDK's gaps report. The gradient flows into
    whichever argument carries one."""
    log_p, log_q = _log_probs(p_logits), _log_probs(q_logits)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def topk_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int) -> torch.Tensor:
    """KL(q_k || p) at each position, where q_k is the teacher's distribution kept on its `k` most likely
    tokens and renormalised there, and p the student's full softmax.

    The teacher's tail (its mass outside the top k) is dropped, not spread: q_k is 0 there, so only
    the student's log-probs of the teacher's top-k tokens are pushed up, and the student's own mass
    on other tokens shrinks through its softmax. With k at least the vocabulary size this is the exact
    forward KL(teacher || student)."""
    k = min(k, teacher_logits.shape[-1])
    top, index = teacher_logits.topk(k, dim=-1)
    log_q = _log_probs(top)  # log_softmax over the k kept logits is the renormalised teacher
    log_p = _log_probs(student_logits).gather(-1, index)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def ddk_update(weights: torch.Tensor, gaps: torch.Tensor, alpha: float) -> torch.Tensor:
    """DDK's smoothed move of the domain sampling weights toward the domains the student lags most on:

        w_new = (1 - alpha) * w_old + alpha * g+ / sum(g+),   g+ = max(gap, 0)

    A domain where the student is already at or past the teacher (gap <= 0) gets no new share. When
    no gap is positive the weights stay as they are. `weights` sum to 1 and so do the new ones."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    positive = gaps.clamp(min=0.0)
    total = positive.sum()
    if total <= 0:
        return weights.clone()
    return (1.0 - alpha) * weights + alpha * positive / total


__all__ = ["ddk_update", "token_kl", "topk_forward_kl"]
