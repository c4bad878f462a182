"""Preplan-and-anchor credit (docs/algorithms.md §4.5): scale token advantages by attention structure.

An extra no-grad forward with eager attention reads one layer's attention maps; WAAD marks
preplan tokens, FAI marks anchor tokens, and the top `anchor_top_q` of them get their advantage
multiplied by 1 + `anchor_kappa`. The constants and the head selection rule are UNVERIFIED in the
spec, so all of them are config keys.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rollmill.algos.anchor import amplify_advantages, anchor_credit_gate
from rollmill.config import AlgorithmConfig
from rollmill.train.batch import TrainBatch


@torch.no_grad()
def attention_maps(model: PreTrainedModel, batch: TrainBatch, layer: int, micro_batch_size: int) -> torch.Tensor:
    """Attention probabilities [B, H, L, L] of `layer` over prompt + completion (eager attention)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa/flash kernels never materialize the probabilities
    device = model.get_output_embeddings().weight.device
    try:
        maps = []
        for start in range(0, batch.size, micro_batch_size):
            mb = batch.select(slice(start, start + micro_batch_size)).to(device)
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                        output_attentions=True, use_cache=False, logits_to_keep=1)
            maps.append(out.attentions[layer].float().cpu())  # the credit math runs on the host
        return torch.cat(maps)
    finally:
        model.set_attn_implementation(previous)


def anchor_scaled_advantages(model: PreTrainedModel, batch: TrainBatch, algo: AlgorithmConfig, micro_batch_size: int):
    """Token advantages [B, C]: the batch's advantages amplified on preplan/anchor tokens."""
    attn = attention_maps(model, batch, algo.anchor_layer, micro_batch_size)
    p, c = batch.prompt_width, batch.completion_width
    valid = batch.attention_mask[:, : p + c].bool() & torch.cat(
        [torch.ones(batch.size, p, dtype=torch.bool), batch.mask.bool()], dim=1)
    gate = anchor_credit_gate(attn, valid, slice(p, p + c), algo.anchor_credit, algo.anchor_window, algo.anchor_top_q)
    return amplify_advantages(batch.token_advantages.expand(-1, c), gate, algo.anchor_kappa, algo.anchor_positive_only)
