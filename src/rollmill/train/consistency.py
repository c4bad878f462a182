"""Train/inference consistency: do the engine's sampled-token log-probs match the trainer's for the same weights?

Both sides should compute the same distribution (same weights, same temperature); what differs is
kernels and summation order, so the gap is float noise (~1e-6 in fp32). A larger gap means the
engine samples from a different policy than the one being trained (wrong weights after a sync, a
different precision, a sampling transform the trainer does not apply) and the importance ratios
are then silently biased. The trainer measures the gap on every step (`logprob_mismatch`, mean per
token, and `logprob_mismatch_max`); this module turns it into a loud signal.
"""

from __future__ import annotations

import logging

import torch

from rollmill.train.batch import build_batch
from rollmill.train.logprobs import completion_logprobs
from rollmill.types import Row

log = logging.getLogger(__name__)


class LogprobMismatchError(RuntimeError):
    """The engine's log-probs disagree with the trainer's beyond the configured bound."""


def logprob_gap(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) absolute difference over the masked tokens; (0, 0) when the mask is empty."""
    diff = (trainer_logp - engine_logp).abs() * mask
    tokens = float(mask.sum())
    if tokens == 0:
        return 0.0, 0.0
    return float(diff.sum()) / tokens, float(diff.max())


def check_logprob_gap(mean: float, engine: str, tolerance: float, action: str, top_p: float = 1.0) -> bool:
    """Warn or raise when the mean per-token gap exceeds `tolerance`; return whether it did.

    With top-p < 1 the engine's log-probs are renormalized over the kept tokens while the trainer's
    are not, so the gap is then expected (it is -log of the kept mass) and only logged at debug level.
    """
    if action == "off" or mean <= tolerance:
        return False
    if top_p < 1.0:
        log.debug("log-prob gap %.2e with top_p=%g: expected, the trainer does not renormalize over top-p", mean, top_p)
        return False
    message = (f"{engine} engine: sampled-token log-probs differ from the trainer's by {mean:.2e} per token on "
               f"average (bound rollout.logprob_tolerance={tolerance:g}): the engine is not sampling from the "
               "policy being trained (stale or wrong weights after a sync, or a different precision)")
    if action == "error":
        raise LogprobMismatchError(message)
    log.warning(message)
    return True


def engine_logprob_gap(model, completions, pad_token_id: int, temperature: float = 1.0) -> dict:
    """How far an engine's sampled-token log-probs are from this model's, for the same completions
    (anything with `prompt_ids`, `token_ids` and `logprobs`).

    Returns {"mean", "max", "tokens"}: the per-token mean and max absolute difference, and the count.
    """
    rows = [Row.sampled(c.prompt_ids, c.token_ids, c.logprobs) for c in completions]
    batch = build_batch(rows, torch.zeros(len(rows)), pad_token_id)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch, temperature=temperature)
    mean, peak = logprob_gap(logp, batch.behaviour_logprobs, batch.mask)
    return {"mean": mean, "max": peak, "tokens": float(batch.mask.sum())}
