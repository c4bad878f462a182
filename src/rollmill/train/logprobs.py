"""Log-probs of completion tokens under a model, computed on packed sequences (no padding FLOPs).

The rows of a batch that share a prompt (the G samples of a group) become one packed sequence:
the prompt once, then each completion after it. A block mask lets every completion see the prompt
and its own earlier tokens only, and positions restart after the prompt for each completion, so
the result is exactly that of G separate forwards: prompt prefill is paid once per sequence and
padding is never computed. The vocabulary projection runs only at positions that predict a completion token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rollmill.train.batch import TrainBatch

# Attention over a packed sequence costs its length squared (the block mask hides, not skips, the
# other completions), so long completions (agent episodes) are packed only a few to a sequence.
PACK_TOKENS = 1024


def _packed_layout(batch: TrainBatch):
    """(ids [S, L], positions [S, L], visibility [S, 1, L, L] (bool), predictor index, target ids, (row, col) of each target).

    S packed sequences (one per distinct prompt); the predictor of a target is the flat index
    (s * L + t) of the position whose output predicts it.
    """
    p = batch.prompt_width
    input_ids, attention_mask = batch.input_ids.cpu(), batch.attention_mask.cpu()  # the layout is host work
    prompt_len = attention_mask[:, :p].sum(-1).tolist()
    comp_len = attention_mask[:, p:].sum(-1).tolist()
    by_prompt: dict[tuple, list[int]] = {}
    for r in range(len(prompt_len)):
        by_prompt.setdefault(tuple(input_ids[r, p - prompt_len[r] : p].tolist()), []).append(r)
    packs = []  # (prompt, rows): a prompt's rows, split so a sequence stays near PACK_TOKENS
    for prompt, rows in by_prompt.items():
        current, length = [], len(prompt)
        for r in rows:
            if current and length + comp_len[r] > PACK_TOKENS:
                packs.append((prompt, current))
                current, length = [], len(prompt)
            current.append(r)
            length += comp_len[r]
        packs.append((prompt, current))
    width = max(len(prompt) + sum(comp_len[r] for r in rows) for prompt, rows in packs)
    count = len(packs)
    ids = torch.zeros(count, width, dtype=torch.long)
    positions = torch.zeros(count, width, dtype=torch.long)
    segment = torch.full((count, width), -1, dtype=torch.long)  # -1 padding, 0 prompt, k>0 completion k
    predictors, targets, rows_cols = [], [], []
    for s, (prompt, rows) in enumerate(packs):
        n = len(prompt)
        ids[s, :n] = torch.tensor(prompt, dtype=torch.long)
        positions[s, :n] = torch.arange(n)
        segment[s, :n] = 0
        at = n
        for k, r in enumerate(rows, start=1):
            c = comp_len[r]
            if c == 0:
                continue
            ids[s, at : at + c] = input_ids[r, p : p + c]
            positions[s, at : at + c] = n + torch.arange(c)
            segment[s, at : at + c] = k
            # token j of the completion is predicted by the prompt's last position (j = 0) or by token j - 1
            predictors.extend([s * width + n - 1] + [s * width + at + j for j in range(c - 1)])
            targets.append(input_ids[r, p : p + c])
            rows_cols.extend((r, j) for j in range(c))
            at += c
    q, k = segment[:, :, None], segment[:, None, :]
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]
    visible = causal & (k >= 0) & ((k == 0) | (k == q))
    visible |= torch.eye(width, dtype=torch.bool)  # padding sees itself, so no row of the softmax is empty
    return ids, positions, visible[:, None], torch.tensor(predictors), torch.cat(targets), rows_cols


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model's own forward would give from these final hidden states.

    The causal-LM wrappers do more than project on a few architectures: a logit scale (Cohere) and
    a final tanh soft-cap (Gemma 2/3); skipping them would give silently wrong log-probs.
    """
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 models stay float64
    scale = getattr(model.config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def completion_logprobs(
    model: PreTrainedModel, batch: TrainBatch, temperature: float = 1.0, with_entropy: bool = False,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, C] of the completion tokens under `model` (and their entropy, detached); 0 on padding.
    They are on the model's device.

    Temperature matches the one used for sampling, so ratios compare like with like. `autocast`
    (bfloat16) runs the transformer body in that dtype; the vocabulary projection and the softmax
    stay in the weights' dtype, where rounding would move every log-prob.
    """
    head = model.get_output_embeddings().weight
    device, out_dtype = head.device, torch.promote_types(head.dtype, torch.float32)
    logp = torch.zeros(batch.mask.shape, dtype=out_dtype, device=device)
    entropy = torch.zeros(batch.mask.shape, dtype=out_dtype, device=device) if with_entropy else None
    if int(batch.attention_mask[:, batch.prompt_width :].sum()) == 0:
        return logp + 0 * sum(p.sum() for p in model.parameters() if p.requires_grad), entropy
    ids, positions, visible, predictors, targets, rows_cols = _packed_layout(batch)
    # additive, not boolean: eager attention (Gemma 2, soft-capped models) adds the mask to the scores
    dtype = autocast or head.dtype
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
        if _is_sharded(model):
            # FSDP2 gathers the root's parameters (embeddings, final norm, head) in the root's forward:
            # go through it, keeping one position's logits, and project the predictors below as usual
            hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        else:
            hidden = model.base_model(**inputs).last_hidden_state
    # index_select, not hidden[...][predictors]: a prompt's last position predicts the first token of every
    # completion packed after it, and the backward of advanced indexing adds repeated rows with CPU atomics
    # in whatever order the threads run, so two runs of the same update differed in the last bits and then
    # in which tokens they sampled; index_select's backward adds them in index order
    logits = _head_logits(model, hidden.flatten(0, 1).index_select(0, predictors.to(device)).to(head.dtype))
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(dim=-1)
    rows = torch.tensor([r for r, _ in rows_cols], device=device)
    cols = torch.tensor([c for _, c in rows_cols], device=device)
    logp = logp.index_put((rows, cols), logp_all.gather(-1, targets.to(device)[:, None]).squeeze(-1))
    if with_entropy:
        with torch.no_grad():
            entropy[rows, cols] = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
