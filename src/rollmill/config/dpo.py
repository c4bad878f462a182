"""The `dpo` section: preference training (`pipeline: dpo`), on a preference file or on the policy's own samples."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rollmill.config.base import Strict


class DPOConfig(Strict):
    """Two data sources. Without `path` (on-policy) each step samples groups as RLVR does; within a group the
    best-scored replies are paired with the worst-scored ones (the task's verifier decides). With `path`
    (offline) each step takes the next `pairs_per_step` pairs of the file and nothing is sampled; the
    reference's log-probs of every pair are computed once before training and cached in the run directory.
    Either way the pairs train against the frozen initial policy. docs/algorithms.md §6 has the losses."""

    loss: Literal["sigmoid", "ipo", "dpo_norm"] = Field("sigmoid", description="sigmoid (DPO), ipo, or dpo_norm "
                                                         "(DPO on per-token mean log-probs)")
    beta: float = Field(0.1, gt=0.0, description="strength of the pull toward the reference")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="conservative DPO: the chance a pair's label is wrong")
    pairs_per_group: int = Field(2, gt=0, description="on-policy: at most this many (chosen, rejected) pairs from one group")
    epochs_per_step: int = Field(1, gt=0, description="optimizer steps on each step's pairs (the reference's "
                                 "log-probs of a pair are computed once, whatever the count)")
    path: str | None = Field(None, description="a .jsonl or .json preference file: each row a `prompt` (text, or a "
                             "list of {role, content} messages) with a `chosen` and a `rejected` reply (text, an "
                             "assistant message, or a list of messages); unset: pairs from the policy's own samples")
    eval_path: str | None = Field(None, description="held-out pairs of the same form for eval/preference_accuracy; "
                                  "unset: task.eval_size rows of `path` held out (seeded by task.seed)")
    pairs_per_step: int = Field(16, gt=0, description="with `path`: pairs in one step, taken from a seeded cursor "
                                "over the file (epoch after epoch; resumable)")
    max_seq_len: int = Field(512, gt=1, description="with `path`: prompt + reply tokens; a longer reply is cut to "
                             "fit, and a pair whose reply has no token left is left out")
    task_accuracy: bool = Field(False, description="with `path`: also report held-out task accuracy at each eval "
                                "(greedy replies to task:'s eval split scored by reward.functions, the RLVR eval)")

    @model_validator(mode="after")
    def _offline_settings_need_path(self) -> "DPOConfig":
        if self.path is None:
            for key in ("eval_path", "task_accuracy"):
                if getattr(self, key):
                    raise ValueError(f"dpo.{key} belongs to training on a preference file: it needs dpo.path")
        return self

    @property
    def offline(self) -> bool:
        """Whether the pairs come from a preference file (`path`) rather than from the policy's samples."""
        return self.path is not None
