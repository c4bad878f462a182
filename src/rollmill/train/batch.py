"""Turning sampled completions into the padded tensors the trainer consumes (one tested function)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollmill.rollout.engine import Completion


@dataclass
class TrainBatch:
    """Prompt left-padded to width P, completion right-padded to width C, so every completion
    starts at column P and the trainer can keep logits for the last C+1 positions only.

    `mask` [B, C] is 1 on tokens the policy generated; `behaviour_logprobs` [B, C] are the engine's.
    """

    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    position_ids: torch.Tensor  # [B, P + C]
    mask: torch.Tensor  # [B, C] float
    behaviour_logprobs: torch.Tensor  # [B, C]
    advantages: torch.Tensor  # [B] per sequence, or [B, C] per token (critic-based estimators)
    prompt_width: int

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_width(self) -> int:
        return self.mask.shape[1]

    @property
    def token_advantages(self) -> torch.Tensor:
        """Advantages shaped to broadcast against [B, C]."""
        return self.advantages if self.advantages.dim() == 2 else self.advantages[:, None]

    def micro_batches(self, size: int):
        """(slice, sub-batch) pairs of at most `size` rows, in order: the unit of one forward/backward."""
        for start in range(0, self.size, size):
            rows = slice(start, start + size)
            yield rows, self.select(rows)

    def select(self, index: torch.Tensor | slice) -> "TrainBatch":
        return TrainBatch(
            self.input_ids[index], self.attention_mask[index], self.position_ids[index], self.mask[index],
            self.behaviour_logprobs[index], self.advantages[index], self.prompt_width,
        )


def build_batch(completions: list[Completion], advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    """Pack completions (each with its prompt) and per-sequence advantages into a TrainBatch.

    An empty completion gets one padding column with mask 0, so it contributes nothing.
    """
    if len(completions) != advantages.numel():
        raise ValueError(f"{len(completions)} completions but {advantages.numel()} advantages")
    p_width = max(len(c.prompt_ids) for c in completions)
    c_width = max(1, max(len(c.token_ids) for c in completions))
    b = len(completions)
    ids = torch.full((b, p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p_width + c_width), dtype=torch.long)
    mask = torch.zeros((b, c_width), dtype=torch.float32)
    beh = torch.zeros((b, c_width), dtype=torch.float32)
    for i, c in enumerate(completions):
        p, n = len(c.prompt_ids), len(c.token_ids)
        ids[i, p_width - p : p_width] = torch.tensor(c.prompt_ids, dtype=torch.long)
        attn[i, p_width - p : p_width + n] = 1
        if n:
            ids[i, p_width : p_width + n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :n] = 1.0
            beh[i, :n] = torch.tensor(c.logprobs, dtype=torch.float32)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(ids, attn, positions, mask, beh, advantages.to(torch.float32).flatten(), p_width)
