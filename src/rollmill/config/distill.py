"""The `distill` section: distilling a teacher model into the policy (`pipeline: distill`, docs/distill.md).

The student is `model:` (often a layer subset of a bigger model, `model.keep_layers`); the teacher is
`distill.teacher`, a model section of its own that must share the student's tokenizer. Prompts come from
`task:`; with `task.mix` each source is a DDK domain whose sampling weight `ddk_every` adapts.
Steps, learning rate and clipping come from `train:`, prompts per step and replies per prompt from
`rollout.prompts_per_step` and `rollout.group_size`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rollmill.config.base import Strict

if TYPE_CHECKING:
    from rollmill.config import ModelConfig

DISTILL_MODES = ("forward_kl", "reverse_kl", "sft")


class DistillConfig(Strict):
    """Where the teacher comes from, which divergence trains the student, and how DDK weighs the domains."""

    teacher: ModelConfig | None = Field(None, description="the teacher, written like `model:` (source smollm2, "
                                        "hf_dir with path, or tiny); required, and its tokenizer must be the "
                                        "student's")
    mode: Literal["forward_kl", "reverse_kl", "sft"] = Field(
        "reverse_kl", description="reverse_kl: on-policy, the student samples and learns KL(student || teacher) "
        "at each of its tokens; forward_kl: off-policy KD on the teacher's replies, KL(teacher top-k || student); "
        "sft: NLL of the teacher's replies")
    top_k: int = Field(20, gt=0, description="forward_kl: the teacher's most likely tokens kept at each position "
                       "(renormalised over them; the tail is dropped)")
    teacher_temperature: float = Field(1.0, ge=0.0, description="forward_kl, sft and the held-out metrics: the "
                                       "temperature the teacher samples its replies at (0: greedy), each prompt's "
                                       "replies generated once and kept")
    max_seq_len: int = Field(512, gt=1, description="tokens per packed training row (prompt + reply); a longer "
                             "example is cut to this length")
    ddk_every: int = Field(0, ge=0, description="DDK: every this many steps, measure each task.mix domain's "
                           "held-out gap to the teacher and move the sampling weights toward the larger gaps; "
                           "0: the weights stay task.mix's")
    ddk_alpha: float = Field(0.5, gt=0.0, le=1.0, description="DDK smoothing: the share of the new weights that "
                             "comes from the normalised gaps (1: the gaps alone)")


__all__ = ["DISTILL_MODES", "DistillConfig"]
