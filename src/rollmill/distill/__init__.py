"""Distillation pieces: the teacher's kept replies, how both models read a reply, the teacher checks.
`rollmill.runtime.distill` runs them; the math is in `rollmill.algos.distill`."""

from rollmill.distill.replies import TeacherReplies, check_teacher, domain_of, generate, reply_example
from rollmill.sft import reply_logits  # how both models read a reply: SFT's, shared

__all__ = ["TeacherReplies", "check_teacher", "domain_of", "generate", "reply_example", "reply_logits"]
