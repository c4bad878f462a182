"""The fallback engine for any transformers causal LM: batched sampling with a transformers KV cache.

Each distinct prompt of a batch is prefilled once and its cache shared by its samples; sequences that
finish leave the batch, so the decode cost follows the live sequences, not the longest one. A step
generates everything queued to the end (`BatchEngine`): simple, but no continuous batching.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from rollmill.rollout.engine import BatchEngine, Completion, Request, copy_weights, hit_stop
from rollmill.rollout.sampling import sample_rows


class GenericHFEngine(BatchEngine):
    """Generation on an in-process transformers model of any architecture (slower than `HFEngine`).

    The engine may share its module with the trainer: then `update_weights` sees the trainer's own
    tensors and only moves the version forward.
    """

    name = "hf_generic"

    def __init__(self, model: PreTrainedModel, tokenizer, batch_size: int = 64, version: int = 0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.version = version
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id}
        self.device = model.get_output_embeddings().weight.device

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        copy_weights(self.model, state, engine=self.name)
        self.version = version

    @torch.no_grad()
    def _run_batch(self, requests: list[Request]) -> list[Completion]:
        if any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("GenericHFEngine.generate: every prompt needs at least one token")
        out: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            out.extend(self._run_chunk(requests[start : start + self.batch_size]))
        return out

    def _prefill(self, prompts: list[tuple[int, ...]], rows: torch.Tensor):
        """Prefill each distinct prompt once, then give every row (`rows[i]` = its prompt) its own cache row."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions, rows = ids.to(self.device), mask.to(self.device), positions.to(self.device), rows.to(self.device)
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        cache.batch_select_indices(rows)
        return cache, logits[rows], mask[rows], positions[rows, -1]

    def _run_chunk(self, requests: list[Request]) -> list[Completion]:
        prompts = list(dict.fromkeys(r.prompt_ids for r in requests))
        which = {p: i for i, p in enumerate(prompts)}
        cache, logits, mask, last_pos = self._prefill(prompts, torch.tensor([which[r.prompt_ids] for r in requests]))
        total = len(requests)
        tokens: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        reasons = ["length"] * total
        live = list(range(total))
        while live:
            rs = [requests[i] for i in live]
            # sampling runs on the CPU whatever the model's device: per-request seeds then draw the same
            next_tok, next_lp = sample_rows(logits.cpu(), [(r.sampling.temperature, r.sampling.top_p) for r in rs],
                                            [r.seed for r in rs], [r.offset + len(tokens[i]) for r, i in zip(rs, live)])
            keep = []
            for row, (seq, tok, lp) in enumerate(zip(live, next_tok.tolist(), next_lp.tolist())):
                tokens[seq].append(tok)
                logprobs[seq].append(lp)
                sp = requests[seq].sampling
                if tok in self.eos_ids or hit_stop(self.tokenizer, requests[seq], tokens[seq]):
                    reasons[seq] = "stop"
                elif len(tokens[seq]) < sp.max_new_tokens:
                    keep.append(row)
            if not keep:
                break
            next_tok = next_tok.to(self.device)
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                next_tok, mask, last_pos = next_tok[index], mask[index], last_pos[index]
                live = [live[k] for k in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            logits = self.model(
                input_ids=next_tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
        return [
            Completion(prompt_index=0, prompt_ids=list(r.prompt_ids), token_ids=tokens[i], logprobs=logprobs[i],
                       text=self.tokenizer.decode(tokens[i], skip_special_tokens=True), finish_reason=reasons[i],
                       policy_version=self.version, request_id=r.id)
            for i, r in enumerate(requests)
        ]
