"""Turning sampled rows into the padded tensors the trainer consumes (one tested function)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollmill.types import ENV_TOKEN, Row


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
    versions: torch.Tensor | None = None  # [B, C] policy version that sampled each token, -1 off the mask

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

    def to(self, device: torch.device) -> "TrainBatch":
        """This batch with its tensors on `device` (itself when they are there already)."""
        if self.mask.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainBatch(move(self.input_ids), move(self.attention_mask), move(self.position_ids), move(self.mask),
                          move(self.behaviour_logprobs), move(self.advantages), self.prompt_width,
                          move(self.segments), move(self.versions))

    def select(self, index: torch.Tensor | slice) -> "TrainBatch":
        return TrainBatch(
            self.input_ids[index], self.attention_mask[index], self.position_ids[index], self.mask[index],
            self.behaviour_logprobs[index], self.advantages[index], self.prompt_width,
            None if self.segments is None else self.segments[index],
            None if self.versions is None else self.versions[index],
        )


def build_batch(rows: list[Row], advantages: torch.Tensor | list[list[float]], pad_id: int) -> TrainBatch:
    """Pack rows (prompt, then tokens with their loss mask) into a TrainBatch: the one way sampled
    data becomes training tensors.

    `advantages` is one value per row (a tensor [N]: RLVR's sequence advantages) or one list per row
    with a value per row token (agent credit; values off the mask are ignored). `segments` numbers
    each row's turns, so chunk-level losses see one chunk per agent turn. An empty row gets one
    padding column with mask 0, so it contributes nothing.
    """
    if len(rows) != len(advantages):
        raise ValueError(f"{len(rows)} rows but {len(advantages)} advantages")
    per_row = isinstance(advantages, torch.Tensor)
    batch = _pack(rows, advantages.to(torch.float32).flatten() if per_row else torch.zeros(len(rows)), pad_id)
    segments = torch.full(batch.mask.shape, -1, dtype=torch.long)
    adv = None if per_row else torch.zeros_like(batch.mask)
    for i, row in enumerate(rows):
        n = len(row.token_ids)
        if n:
            segments[i, :n] = torch.tensor(row.turn_of_token, dtype=torch.long)
        if adv is not None:
            if len(advantages[i]) != n:
                raise ValueError(f"row {i} has {n} tokens but {len(advantages[i])} advantages")
            if n:
                adv[i, :n] = torch.tensor(advantages[i], dtype=torch.float32)
    if adv is not None:
        batch.advantages = adv * batch.mask
    batch.segments = torch.where(batch.mask > 0, segments, -1)
    return batch


def _pack(rows: list[Row], advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    p_width = max(len(r.prompt_ids) for r in rows)
    c_width = max(1, max(len(r.token_ids) for r in rows))
    b = len(rows)
    ids = torch.full((b, p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p_width + c_width), dtype=torch.long)
    mask = torch.zeros((b, c_width), dtype=torch.float32)
    beh = torch.zeros((b, c_width), dtype=torch.float32)
    versions = torch.full((b, c_width), ENV_TOKEN, dtype=torch.long)
    for i, row in enumerate(rows):
        p, n = len(row.prompt_ids), len(row.token_ids)
        ids[i, p_width - p : p_width] = torch.tensor(row.prompt_ids, dtype=torch.long)
        attn[i, p_width - p : p_width + n] = 1
        if n:
            ids[i, p_width : p_width + n] = torch.tensor(row.token_ids, dtype=torch.long)
            mask[i, :n] = torch.tensor(row.mask, dtype=torch.float32)
            beh[i, :n] = torch.tensor(row.logprobs, dtype=torch.float32)
            versions[i, :n] = torch.tensor(row.versions, dtype=torch.long)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(ids, attn, positions, mask, beh, advantages, p_width, versions=versions)
