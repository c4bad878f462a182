"""Sequence packing and the token loss of SFT.

Examples (token ids with a 0/1 loss mask) are packed in order into rows of at most `max_seq_len`
tokens. Within a row each example keeps its own positions (restarting at 0) and attends only to its
own earlier tokens: the 4D attention mask is block-diagonal and causal, additive (0 or the dtype's
minimum) so eager and SDPA attention both take it, on CPU as on GPU; no varlen kernel is needed. A
packed row therefore gives every token the loss it would have alone (tests/test_sft.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollmill.train.logprobs import _head_logits


@dataclass(frozen=True)
class Tokenized:
    """One example: its token ids and loss mask (1 = trained: predicted from the tokens before it)."""

    ids: tuple[int, ...]
    mask: tuple[int, ...]

    @property
    def trained(self) -> int:
        """Tokens the loss covers (the first token has nothing before it to be predicted from)."""
        return sum(self.mask[1:])

    def cut(self, max_len: int) -> "Tokenized":
        """The first `max_len` tokens (the example itself when it fits)."""
        return self if len(self.ids) <= max_len else Tokenized(self.ids[:max_len], self.mask[:max_len])


def pack_rows(lengths: list[int], max_len: int, pack: bool = True) -> list[list[int]]:
    """Which examples go in which row: indices in order, a new row whenever the next example would not
    fit in `max_len` tokens (each at most `max_len`); with `pack` false one example per row."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    used = max_len  # forces a first row
    for i, n in enumerate(lengths):
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


@dataclass
class PackedBatch:
    """Rows of packed examples, right-padded to the longest row."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L] restarting at 0 for each example
    segments: torch.Tensor  # [R, L] the example's number within its row, -1 on padding
    loss_mask: torch.Tensor  # [R, L] 1 on trained tokens

    @property
    def tokens(self) -> int:
        """Trained tokens in the batch."""
        return int(self.loss_mask.sum())

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[R, 1, L, L] additive mask: a token sees its own example's tokens up to itself (padding sees
        itself, so no row of the softmax is empty)."""
        width = self.input_ids.shape[1]
        q, k = self.segments[:, :, None], self.segments[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        visible = (causal & (q == k) & (k >= 0)) | torch.eye(width, dtype=torch.bool)
        return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def collate(rows: list[list[Tokenized]], pad_id: int) -> PackedBatch:
    """The rows (each a list of examples, together at most the row length) as padded tensors."""
    width = max(sum(len(e.ids) for e in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.float32)
    for r, row in enumerate(rows):
        at = 0
        for k, example in enumerate(row):
            n = len(example.ids)
            ids[r, at : at + n] = torch.tensor(example.ids)
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = k
            mask[r, at : at + n] = torch.tensor(example.mask, dtype=torch.float32)
            mask[r, at] = 0.0  # an example's first token has nothing in its example to be predicted from
            at += n
    return PackedBatch(ids, positions, segments, mask)


def packed_batches(examples: list[Tokenized], max_len: int, pack: bool, rows_per_batch: int,
                   pad_id: int) -> list[PackedBatch]:
    """`examples` (each at most `max_len` tokens) packed into rows (`pack_rows`), `rows_per_batch` rows a batch."""
    rows = [[examples[i] for i in row] for row in pack_rows([len(e.ids) for e in examples], max_len, pack)]
    return [collate(rows[s : s + rows_per_batch], pad_id) for s in range(0, len(rows), rows_per_batch)]


def reply_logits(model, batch: PackedBatch, autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], token ids [T]) at each trained token of `batch`, in row-major order on the model's
    device; the logits are those of the position before the token, which predict it. `autocast` (bfloat16)
    runs the transformer body in that dtype; the vocabulary projection stays in the weights' dtype. Only the
    positions that predict a trained token are projected onto the vocabulary."""
    head = model.get_output_embeddings().weight
    device = head.device
    dtype = autocast or head.dtype
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        hidden = model.base_model(input_ids=batch.input_ids.to(device),
                                  attention_mask=batch.attention_mask(dtype).to(device),
                                  position_ids=batch.position_ids.to(device)).last_hidden_state
    targets = batch.loss_mask.flatten().nonzero().squeeze(-1)  # mask is 0 at column 0: targets - 1 is in the row
    # index_select, as in completion_logprobs: its backward is deterministic on CPU
    logits = _head_logits(model, hidden.flatten(0, 1).index_select(0, (targets - 1).to(device)).to(head.dtype))
    return logits, batch.input_ids.flatten()[targets].to(device)


def token_nll(model, batch: PackedBatch, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Negative log-likelihood of each trained token of `batch` under `model`, in row-major order ([T], on
    the model's device, at least float32); `autocast` as in `reply_logits`."""
    logits, labels = reply_logits(model, batch, autocast)
    return F.cross_entropy(logits, labels, reduction="none")
