"""Turning next-token logits into sampled tokens and their log-probs (pure functions)."""

from __future__ import annotations

import torch


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # keep a token if the mass before it is still below top_p (so the top token is always kept)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` [B, V]; return (tokens [B], logprobs [B]).

    Log-probs are those of the distribution sampled from (scaled by temperature, top-p filtered
    and renormalized). Greedy (temperature 0) reports the log-prob under the unscaled logits.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    logp = filter_top_p(logits / temperature, top_p).log_softmax(dim=-1)
    tokens = sample_inverse_cdf(logp.exp(), generator)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` [B, V]: the first index whose cumulative probability exceeds a uniform draw.

    Same distribution as `torch.multinomial(probs, 1)` at a fraction of its CPU cost (~40x at V=49k):
    one cumulative sum and a binary search per row. A zero-probability token is never chosen, since
    the search lands only where the cumulative sum rises.
    """
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
