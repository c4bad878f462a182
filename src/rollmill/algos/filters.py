"""Sample filters and length shaping (docs/algorithms.md §2.13-2.14), as pure functions over scores.

`scores` are scalar rewards grouped by prompt, shape [P, G]. Filters return masks; the pipeline
decides what to do with them (refill the batch, zero a sample's loss).
"""

from __future__ import annotations

import torch


def informative_groups(
    scores: torch.Tensor, std_threshold: float = 0.0, mean_low: float = float("-inf"), mean_high: float = float("inf")
) -> torch.Tensor:
    """Keep mask [P] for DAPO dynamic sampling: a group survives if its std > `std_threshold` and
    its mean lies strictly inside (`mean_low`, `mean_high`). Groups of one have std 0."""
    std = scores.std(dim=1, unbiased=True) if scores.shape[1] > 1 else torch.zeros(scores.shape[0])
    mean = scores.mean(dim=1)
    return (std > std_threshold) & (mean > mean_low) & (mean < mean_high)


def difficulty_mask(scores: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Per-sample weights [P, G]: 1 where the group's mean score is strictly inside (low, high),
    else 0 (all-solved and all-failed groups carry no signal and are dropped from the loss)."""
    mean = scores.mean(dim=1, keepdim=True)
    keep = (mean > low) & (mean < high)
    return keep.expand_as(scores).to(torch.float32)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max_len - cache_len tokens, then a linear ramp to -1
    at max_len, and -1 beyond it."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = lengths.to(torch.float32)
    free = max_len - cache_len
    ramp = (free - lengths) / cache_len
    penalty = torch.where(lengths <= max_len, ramp, -torch.ones_like(lengths))
    return torch.where(lengths <= free, torch.zeros_like(lengths), penalty)
