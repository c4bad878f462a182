"""The `sft` section: supervised fine-tuning (`pipeline: sft`) on demonstrations.

The data is either the task's prompt/answer rows (`task:` as RL runs use it; the verified answer,
formatted by `completion_format`, is the assistant reply) or a file of chat conversations (`path`),
whose every assistant turn trains. Steps, learning rate, schedule and clipping come from `train:`.
"""

from __future__ import annotations

from string import Formatter

from pydantic import Field, field_validator, model_validator

from rollmill.config.base import Strict


class SFTConfig(Strict):
    """What SFT trains on, how examples are packed into rows, and what one step is."""

    path: str | None = Field(None, description="a .jsonl or .json file of chat conversations (each row's "
                             "`messages_field`: a list of {role, content}), every assistant turn trained; unset: "
                             "the task's prompt/answer rows, the verified answer as the assistant reply")
    eval_path: str | None = Field(None, description="held-out conversations for eval/loss; unset: task.eval_size "
                                  "rows of `path` held out (seeded by task.seed)")
    messages_field: str = Field("messages", description="the field of a `path` row that holds its conversation")
    completion_format: str = Field("{answer}", description="task rows: the assistant reply made of the verified "
                                   "answer, e.g. 'The answer is {answer}.'")
    examples_per_step: int = Field(32, gt=0, description="examples (conversations) in one optimizer step")
    pack: bool = Field(True, description="pack several examples into one row up to max_seq_len (positions restart "
                       "and attention stops at each example's boundary); false: one example per row")
    max_seq_len: int = Field(512, gt=1, description="tokens per row; a longer example is cut to this length")
    task_accuracy: bool | None = Field(None, description="held-out task accuracy at each eval: greedy replies to the "
                                       "task's eval split scored by reward.functions (the RLVR eval); unset: on for "
                                       "task rows, off for chat conversations")

    @field_validator("completion_format")
    @classmethod
    def _answer_placeholder(cls, value: str) -> str:
        try:
            fields = {name for _, name, _, _ in Formatter().parse(value) if name is not None}
        except ValueError as err:
            raise ValueError(f"not a format string ({err}); use {{answer}} for the answer, {{{{ }}}} for braces") from None
        if fields != {"answer"}:
            raise ValueError(f"must contain the placeholder {{answer}} and no other (found {sorted(fields)})")
        return value

    @model_validator(mode="after")
    def _eval_path_needs_path(self) -> "SFTConfig":
        if self.eval_path is not None and self.path is None:
            raise ValueError("sft.eval_path holds chat conversations: it needs sft.path (the training conversations)")
        return self

    @property
    def measures_accuracy(self) -> bool:
        """Whether evals report held-out task accuracy (`task_accuracy`, or its default for the data)."""
        return self.task_accuracy if self.task_accuracy is not None else self.path is None
