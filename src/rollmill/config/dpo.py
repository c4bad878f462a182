"""The `dpo` section: preference training on pairs of the policy's own samples (`pipeline: dpo`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollmill.config.base import Strict


class DPOConfig(Strict):
    """Each step samples groups as RLVR does; within a group the best-scored replies are paired with the
    worst-scored ones (the task's verifier decides) and one DPO update runs on the pairs against the
    frozen initial policy. docs/algorithms.md §6 has the losses."""

    loss: Literal["sigmoid", "ipo", "dpo_norm"] = Field("sigmoid", description="sigmoid (DPO), ipo, or dpo_norm "
                                                         "(DPO on per-token mean log-probs)")
    beta: float = Field(0.1, gt=0.0, description="strength of the pull toward the reference")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="conservative DPO: the chance a pair's label is wrong")
    pairs_per_group: int = Field(2, gt=0, description="at most this many (chosen, rejected) pairs from one group")
