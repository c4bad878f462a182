"""The fallback engine for any transformers causal LM: batched sampling with a transformers KV cache.

Each prompt is prefilled once and its cache shared by its `n` samples; sequences that finish
leave the batch, so the decode cost follows the live sequences, not the longest one.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from rollmill.rollout.engine import Completion, SamplingParams, copy_weights
from rollmill.rollout.sampling import sample_tokens


class GenericHFEngine:
    """Generation on an in-process transformers model of any architecture (slower than `HFEngine`).

    The engine may share its module with the trainer (the single-machine default): then
    `update_weights` sees the trainer's own tensors and only moves the version forward.
    """

    name = "hf_generic"

    def __init__(self, model: PreTrainedModel, tokenizer, batch_size: int = 64, version: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.version = version
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id}

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        copy_weights(self.model, state, engine=self.name)
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None = None) -> list[Completion]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("GenericHFEngine.generate: every prompt needs at least one token")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        per_chunk = max(1, self.batch_size // sampling.n)
        out: list[Completion] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start : start + per_chunk]
            out.extend(self._generate_chunk(chunk, start, sampling, generator))
        return out

    def _prefill(self, prompts: list[list[int]], n: int):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
            positions = positions.repeat_interleave(n, dim=0)
        return cache, logits, mask, positions[:, -1]

    def _generate_chunk(self, prompts, offset, sp: SamplingParams, generator):
        cache, logits, mask, last_pos = self._prefill(prompts, sp.n)
        total = len(prompts) * sp.n
        tokens: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        reasons = ["length"] * total
        live = torch.arange(total)
        for _ in range(sp.max_new_tokens):
            next_tok, next_lp = sample_tokens(logits, sp.temperature, sp.top_p, generator)
            finished = []
            for row, (seq, tok, lp) in enumerate(zip(live.tolist(), next_tok.tolist(), next_lp.tolist())):
                tokens[seq].append(tok)
                logprobs[seq].append(lp)
                if tok in self.eos_ids or (sp.stop and self._hit_stop(tokens[seq], sp.stop)):
                    reasons[seq] = "stop"
                    finished.append(row)
            if len(finished) == len(live):
                break
            if finished:
                keep = torch.tensor([r for r in range(len(live)) if r not in set(finished)])
                cache.batch_select_indices(keep)
                live, next_tok, mask, last_pos = live[keep], next_tok[keep], mask[keep], last_pos[keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype)], dim=1)
            last_pos = last_pos + 1
            logits = self.model(
                input_ids=next_tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
        return [
            Completion(
                prompt_index=offset + i // sp.n,
                prompt_ids=list(prompts[i // sp.n]),
                token_ids=tokens[i],
                logprobs=logprobs[i],
                text=self.tokenizer.decode(tokens[i], skip_special_tokens=True),
                finish_reason=reasons[i],
                policy_version=self.version,
            )
            for i in range(total)
        ]

    def _hit_stop(self, token_ids: list[int], stop: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(token_ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in stop)
