"""The default engine: continuous batching over a slot KV cache on an in-process transformers model.

- A prompt is prefilled once and its K/V copied to the rows of its `n` samples; identical prompts in
  one call (the G episodes of a group at turn 0) are merged first.
- A sequence that finishes leaves the batch at once, and the next waiting group takes its rows, so the
  batch stays full until the queue runs dry.
- Finished sequences leave their K/V in a `PrefixStore`: the next turn of an episode (its previous
  context, reply, then the new observation) prefills only the observation.
- Per-token log-probs are those of the distribution actually sampled from (temperature, top-p).

Models outside the Llama family fall back to `GenericHFEngine` (see `build_engine`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from rollmill.rollout.decoder import Decoder
from rollmill.rollout.engine import Completion, SamplingParams, copy_weights
from rollmill.rollout.kv import PrefixStore, SlotKV
from rollmill.rollout.sampling import sample_tokens


@dataclass
class _Group:
    """Samples of one prompt that are admitted together (their rows share one prefill)."""

    prompt: list[int]
    outputs: list[int]  # indices into the call's result list


@dataclass
class _Row:
    output: int
    length: int  # tokens whose K/V are in the cache = position of the next token fed
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class EngineStats:
    """Counters since the engine was built: where generation time and tokens went."""

    prefill_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    sample_s: float = 0.0


class HFEngine:
    """Fast generation on an in-process Llama-family transformers model.

    The engine may share its module with the trainer (the single-machine default); it still serves
    the weights of the last `update_weights` (its fused copies are rebuilt there, and cached K/V of
    the old weights dropped), so an optimizer step never changes a rollout in flight.
    """

    name = "hf"

    def __init__(self, model: PreTrainedModel, tokenizer, batch_size: int = 64, version: int = 0,
                 prefix_cache_mb: int = 1024, prefill_tokens: int = 4096, dtype: torch.dtype | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, dtype)  # dtype None: the model's own
        self.batch_size = batch_size
        self.prefill_tokens = prefill_tokens
        self.version = version
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id}
        self.prefixes = PrefixStore(prefix_cache_mb * 2**20)
        self.stats = EngineStats()
        self._kv: SlotKV | None = None

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        copy_weights(self.model, state, engine=self.name)
        self.decoder.refresh()
        self.prefixes.clear()
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None = None) -> list[Completion]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: every prompt needs at least one token")
        if not prompts:
            return []
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        results: list[Completion | None] = [None] * (len(prompts) * sampling.n)
        # +1 fed token, +1 padding sink
        kv = self._cache(min(self.batch_size, len(results)), max(len(p) for p in prompts) + sampling.max_new_tokens + 2)
        rows: list[_Row] = []
        pending = deque(self._groups(prompts, sampling.n))
        logits = torch.empty(0, 0)
        while pending or rows:
            admitted = self._admit(kv, rows, pending)
            if admitted is not None:
                logits = admitted if logits.numel() == 0 else torch.cat([logits, admitted])
            t0 = time.perf_counter()
            tokens, logprobs = sample_tokens(logits, sampling.temperature, sampling.top_p, generator)
            self.stats.sample_s += time.perf_counter() - t0
            done = self._record(rows, tokens.tolist(), logprobs.tolist(), sampling)
            keep = self._retire(kv, rows, done, sampling, results, prompts)
            logits = torch.empty(0, 0)
            if rows:
                t0 = time.perf_counter()
                fed = tokens[keep][:, None]
                starts = torch.tensor([r.length for r in rows])
                logits = self.decoder.forward(kv, list(range(len(rows))), fed, starts, torch.zeros(len(rows), dtype=torch.long))
                for r in rows:
                    r.length += 1
                self.stats.decode_s += time.perf_counter() - t0
        return results

    def _cache(self, slots: int, capacity: int) -> SlotKV:
        """The engine's cache, regrown when a call needs more rows or positions than it has.

        Positions grow geometrically (x2, in steps of 256): a multi-turn rollout's context grows every
        turn, and memory is touched only as positions are used (see `SlotKV`), so headroom is free.
        """
        old = self._kv
        if old is not None and old.slots >= slots and old.capacity >= capacity:
            return old
        if old is not None:
            slots = max(slots, old.slots)
            capacity = old.capacity if old.capacity >= capacity else max(capacity, old.capacity * 2)
        self._kv = None  # free the old one before allocating the new one
        self._kv = self.decoder.new_cache(slots, -(-capacity // 256) * 256)
        return self._kv

    def _groups(self, prompts: list[list[int]], n: int) -> list[_Group]:
        """One group per distinct prompt (identical prompts merged), split to fit the batch."""
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            by_prompt.setdefault(tuple(p), []).extend(range(i * n, (i + 1) * n))
        groups = []
        for prompt, outputs in by_prompt.items():
            for start in range(0, len(outputs), self.batch_size):
                groups.append(_Group(list(prompt), outputs[start : start + self.batch_size]))
        return groups

    def _admit(self, kv: SlotKV, rows: list[_Row], pending: deque) -> torch.Tensor | None:
        """Prefill the waiting groups that fit into free rows; return the logits of the new rows."""
        admitted: list[tuple[_Group, int, int]] = []  # group, first row, reused prefix length
        free = kv.slots - len(rows)
        while pending and len(pending[0].outputs) <= free:
            group = pending.popleft()
            first = len(rows)
            reused, cached = self.prefixes.longest_prefix(group.prompt, limit=len(group.prompt) - 1)
            if cached is not None:
                kv.load(first, cached)
            rows.extend(_Row(o, len(group.prompt), group.prompt) for o in group.outputs)
            admitted.append((group, first, reused))
            free -= len(group.outputs)
        if not admitted:
            return None
        t0 = time.perf_counter()
        heads = []
        for chunk in self._prefill_chunks(admitted):
            heads.append(self._prefill(kv, chunk))
        head_logits = torch.cat(heads)
        out = []
        for (group, first, _), logit in zip(admitted, head_logits):
            for row in range(first + 1, first + len(group.outputs)):
                kv.move(first, row, len(group.prompt))
            out.append(logit.expand(len(group.outputs), -1))
        self.stats.prefill_s += time.perf_counter() - t0
        return torch.cat(out)

    def _prefill_chunks(self, admitted):
        """Split the admitted groups so each prefill forward holds at most `prefill_tokens` (padded) tokens."""
        chunk, width = [], 0
        for item in admitted:
            suffix = len(item[0].prompt) - item[2]
            if chunk and (len(chunk) + 1) * max(width, suffix) > self.prefill_tokens:
                yield chunk
                chunk, width = [], 0
            chunk.append(item)
            width = max(width, suffix)
        if chunk:
            yield chunk

    def _prefill(self, kv: SlotKV, chunk) -> torch.Tensor:
        suffixes = [group.prompt[reused:] for group, _, reused in chunk]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        for b, s in enumerate(suffixes):
            ids[b, : len(s)] = torch.tensor(s)
        starts = torch.tensor([reused for _, _, reused in chunk])
        last = torch.tensor([len(s) - 1 for s in suffixes])
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)
        self.stats.reused_tokens += int(starts.sum())
        return self.decoder.forward(kv, [first for _, first, _ in chunk], ids, starts, last)

    def _record(self, rows: list[_Row], tokens: list[int], logprobs: list[float], sp: SamplingParams) -> set[int]:
        """Append each row's sampled token; return the rows that just finished."""
        done = set()
        for i, (row, tok, lp) in enumerate(zip(rows, tokens, logprobs)):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            if tok in self.eos_ids or (sp.stop and self._hit_stop(row.tokens, sp.stop)):
                row.finish_reason = "stop"
            if row.finish_reason == "stop" or len(row.tokens) >= sp.max_new_tokens:
                done.add(i)
        self.stats.generated_tokens += len(rows)
        return done

    def _retire(self, kv: SlotKV, rows: list[_Row], done: set[int], sp: SamplingParams, results, prompts) -> list[int]:
        """Turn finished rows into completions, keep their K/V, and pack the live rows to the front.

        Returns, for each row after packing, the index it had before (to carry its sampled token)."""
        for i in sorted(done):
            row = rows[i]
            results[row.output] = Completion(
                prompt_index=row.output // sp.n, prompt_ids=list(prompts[row.output // sp.n]), token_ids=row.tokens,
                logprobs=row.logprobs, text=self.tokenizer.decode(row.tokens, skip_special_tokens=True),
                finish_reason=row.finish_reason, policy_version=self.version,
            )
            if self.prefixes.max_bytes > 0:
                self.prefixes.put(row.prompt + row.tokens[:-1], kv.export(i, row.length))
        live = len(rows) - len(done)
        holes = [i for i in sorted(done) if i < live]
        movers = [i for i in range(live, len(rows)) if i not in done]
        source = list(range(len(rows)))
        for hole, mover in zip(holes, movers):
            kv.move(mover, hole, rows[mover].length)
            rows[hole] = rows[mover]
            source[hole] = mover
        del rows[live:]
        return source[:live]

    def _hit_stop(self, token_ids: list[int], stop: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(token_ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in stop)
