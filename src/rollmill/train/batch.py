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
    advantages: torch.Tensor  # [B] per sequence, or [B, C] per token (critic-based estimators, agent credit)
    prompt_width: int
    segments: torch.Tensor | None = None  # [B, C] chunk id of each token (agent turns), -1 off the mask

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
            None if self.segments is None else self.segments[index],
        )


def build_batch(completions: list[Completion], advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    """Pack completions (each with its prompt) and per-sequence advantages into a TrainBatch.

    An empty completion gets one padding column with mask 0, so it contributes nothing.
    """
    if len(completions) != advantages.numel():
        raise ValueError(f"{len(completions)} completions but {advantages.numel()} advantages")
    return _pack([c.prompt_ids for c in completions], [c.token_ids for c in completions],
                 [[1] * len(c.token_ids) for c in completions], [c.logprobs for c in completions],
                 advantages.to(torch.float32).flatten(), pad_id)


def build_row_batch(rows: list, token_advantages: list[list[float]], pad_id: int) -> TrainBatch:
    """Pack agent rows (`rollmill.agent.Row`: env text masked out) with one advantage per row token.

    `segments` numbers each row's turns, so chunk-level losses see one chunk per agent turn.
    """
    if len(rows) != len(token_advantages):
        raise ValueError(f"{len(rows)} rows but {len(token_advantages)} advantage lists")
    batch = _pack([r.prompt_ids for r in rows], [r.token_ids for r in rows], [r.mask for r in rows],
                  [r.logprobs for r in rows], torch.zeros(len(rows)), pad_id)
    adv = torch.zeros_like(batch.mask)
    segments = torch.full(batch.mask.shape, -1, dtype=torch.long)
    for i, (row, values) in enumerate(zip(rows, token_advantages)):
        n = len(row.token_ids)
        if len(values) != n:
            raise ValueError(f"row {i} has {n} tokens but {len(values)} advantages")
        if n:
            adv[i, :n] = torch.tensor(values, dtype=torch.float32)
            segments[i, :n] = torch.tensor(row.turn_of_token, dtype=torch.long)
    batch.advantages = adv * batch.mask
    batch.segments = torch.where(batch.mask > 0, segments, -1)
    return batch


def _pack(prompts: list[list[int]], tokens: list[list[int]], masks: list[list[int]], logprobs: list[list[float]],
          advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    p_width = max(len(p) for p in prompts)
    c_width = max(1, max(len(t) for t in tokens))
    b = len(prompts)
    ids = torch.full((b, p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p_width + c_width), dtype=torch.long)
    mask = torch.zeros((b, c_width), dtype=torch.float32)
    beh = torch.zeros((b, c_width), dtype=torch.float32)
    for i, (prompt, toks, m, lp) in enumerate(zip(prompts, tokens, masks, logprobs)):
        p, n = len(prompt), len(toks)
        ids[i, p_width - p : p_width] = torch.tensor(prompt, dtype=torch.long)
        attn[i, p_width - p : p_width + n] = 1
        if n:
            ids[i, p_width : p_width + n] = torch.tensor(toks, dtype=torch.long)
            mask[i, :n] = torch.tensor(m, dtype=torch.float32)
            beh[i, :n] = torch.tensor(lp, dtype=torch.float32)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(ids, attn, positions, mask, beh, advantages, p_width)
