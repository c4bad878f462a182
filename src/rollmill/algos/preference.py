"""Preference losses over (chosen, rejected) pairs: DPO and its usual variants (docs/algorithms.md §6).

Every loss takes per-pair sequence log-probabilities of the chosen and rejected completions under
the policy and under the frozen reference, each [P], and returns `PreferenceOutput` with the
per-pair loss and the implicit rewards `beta * (logp - ref_logp)` that preference runs log. How a
sequence's log-probability is formed from its tokens (a sum, or a mean per token for the
length-normalised forms) is `sequence_logps`'s job, chosen by `PREFERENCE_LOSSES`' entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # [P] per pair
    chosen_reward: torch.Tensor  # [P] beta * (logp_c - ref_c), detached
    rejected_reward: torch.Tensor  # [P] beta * (logp_r - ref_r), detached


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """[B]: the masked sum of token log-probs [B, L] per row, or their mean over the row's valid tokens.

    Masked positions never reach the sum (a non-finite value there is dropped); a row with no valid
    token gives 0."""
    kept = torch.where(mask > 0, token_logps, torch.zeros_like(token_logps)).sum(-1)
    return kept / mask.sum(-1).clamp(min=1) if average else kept


def _margin(chosen, rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = (logp_c - ref_c) - (logp_r - ref_r): how much more the policy prefers chosen than the reference does."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def _output(loss, chosen, rejected, ref_chosen, ref_rejected, beta) -> PreferenceOutput:
    return PreferenceOutput(loss, (beta * (chosen - ref_chosen)).detach(), (beta * (rejected - ref_rejected)).detach())


def dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta: float = 0.1,
                     label_smoothing: float = 0.0) -> PreferenceOutput:
    """DPO (Rafailov et al. 2023): l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    `label_smoothing` eps > 0 is conservative DPO (the pair's label is wrong with probability eps)."""
    h = beta * _margin(chosen, rejected, ref_chosen, ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return _output(loss, chosen, rejected, ref_chosen, ref_rejected, beta)


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> PreferenceOutput:
    """IPO (Azar et al. 2023): l = (h - 1/(2 beta))^2, a squared loss that keeps the margin from growing
    without bound. Its log-probs are per-token means (`PREFERENCE_LOSSES` marks it so), as TRL uses."""
    if label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid losses, not to ipo")
    loss = (_margin(chosen, rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2
    return _output(loss, chosen, rejected, ref_chosen, ref_rejected, beta)


# name -> (loss, whether sequence log-probs are per-token means): "dpo_norm" is DPO's sigmoid loss on
# length-normalised log-probs, so a long chosen reply is not preferred for its length alone.
PREFERENCE_LOSSES: dict[str, tuple[Callable[..., PreferenceOutput], bool]] = {
    "sigmoid": (dpo_sigmoid_loss, False),
    "ipo": (ipo_loss, True),
    "dpo_norm": (dpo_sigmoid_loss, True),
}


def preference_loss(name: str, token_logps: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                    beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceOutput:
    """The `name` loss from token log-probs [P, L] keyed `chosen`, `rejected`, `ref_chosen`,
    `ref_rejected`, with `masks` keyed `chosen` and `rejected` (the reference shares the policy's)."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; allowed: {sorted(PREFERENCE_LOSSES)}")
    fn, average = PREFERENCE_LOSSES[name]
    seq = {k: sequence_logps(v, masks[k.removeprefix("ref_")], average) for k, v in token_logps.items()}
    return fn(seq["chosen"], seq["rejected"], seq["ref_chosen"], seq["ref_rejected"], beta=beta,
              label_smoothing=label_smoothing)
