"""The default engine: continuous batching over a slot KV cache on an in-process transformers model.

- Work is request-level: requests queue (`submit`), each `step` admits what fits and decodes one token
  for every running row, and a request can be stopped with its partial output (`abort`).
- A prompt is prefilled once and its K/V copied to the rows of its samples; identical prompts submitted
  together (the G samples of a group, or its G episodes at turn 0) are merged first.
- A sequence that finishes leaves the batch at once, and the next waiting group takes its rows, so the
  batch stays full while there is work queued.
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
from rollmill.rollout.engine import Completion, EngineBase, Request, copy_weights, hit_stop
from rollmill.rollout.kv import PrefixStore, SlotKV
from rollmill.rollout.sampling import sample_rows


@dataclass
class _Group:
    """Requests with one prompt that are admitted together (their rows share one prefill)."""

    prompt: list[int]
    requests: list[Request]


@dataclass
class _Row:
    request: Request
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
    busy_row_steps: int = 0  # sum over decode steps of the rows decoded (occupancy = this / steps / batch_size)
    steps: int = 0
    # rows decoded -> [decode steps, seconds of sampling + decode forward]: the step-time curve a
    # scheduling model needs (benchmarks/long_tail.py records it, benchmarks/simulate.py fits it)
    by_rows: dict[int, list] = field(default_factory=dict)


class HFEngine(EngineBase):
    """Fast generation on an in-process Llama-family transformers model.

    The engine may share its module with the trainer; it still serves the weights of the last
    `update_weights` (its fused copies are rebuilt there, and cached K/V of the old weights dropped),
    so an optimizer step never changes a rollout in flight.
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
        self._rows: list[_Row] = []  # live rows, packed at cache rows 0..n-1
        self._pending: deque[_Group] = deque()
        self._logits = torch.empty(0, 0)  # next-token logits of the live rows

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        if self._rows:
            raise RuntimeError(f"hf engine: update_weights with {len(self._rows)} rows running; abort or finish them first")
        copy_weights(self.model, state, engine=self.name)
        self.decoder.refresh()
        self.prefixes.clear()
        self.version = version

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._pending)

    def submit(self, requests: list[Request]) -> None:
        """Queue requests; identical prompts in one call are merged so they share a prefill."""
        for r in requests:
            if not r.prompt_ids:
                raise ValueError("HFEngine.generate: every prompt needs at least one token")
        by_prompt: dict[tuple[int, ...], list[Request]] = {}
        for r in requests:
            by_prompt.setdefault(tuple(r.prompt_ids), []).append(r)
        for prompt, group in by_prompt.items():
            for start in range(0, len(group), self.batch_size):
                self._pending.append(_Group(list(prompt), group[start : start + self.batch_size]))

    @torch.no_grad()
    def step(self) -> list[Completion]:
        """Admit waiting groups into free rows, sample one token for every row, retire finished rows,
        and run the decode forward that gives the next step's logits."""
        if not self.busy:
            return []
        admitted = self._admit()
        if admitted is not None:
            self._logits = admitted if self._logits.numel() == 0 else torch.cat([self._logits, admitted])
        rows = self._rows
        t0 = time.perf_counter()
        tokens, logprobs = self._sample(rows, self._logits)
        t_sample = time.perf_counter() - t0
        self.stats.sample_s += t_sample
        done = self._record(rows, tokens.tolist(), logprobs.tolist())
        finished, keep = self._retire(done)
        self._logits = torch.empty(0, 0)
        if self._rows:
            t0 = time.perf_counter()
            kv = self._kv
            fed = tokens[keep][:, None]
            starts = torch.tensor([r.length for r in self._rows])
            self._logits = self.decoder.forward(kv, list(range(len(self._rows))), fed, starts,
                                                torch.zeros(len(self._rows), dtype=torch.long))
            for r in self._rows:
                r.length += 1
            t_decode = time.perf_counter() - t0
            self.stats.decode_s += t_decode
            self.stats.busy_row_steps += len(self._rows)
            self.stats.steps += 1
            entry = self.stats.by_rows.setdefault(len(self._rows), [0, 0.0])
            entry[0] += 1
            entry[1] += t_sample + t_decode
        return finished

    def abort(self, ids: set | None = None) -> list[Completion]:
        """Stop requests (all when `ids` is None): queued ones return no tokens, running ones what they sampled."""
        hit = lambda r: ids is None or r.id in ids  # noqa: E731
        out = []
        for group in list(self._pending):
            out.extend(self._completion(_Row(r, 0, group.prompt), "abort") for r in group.requests if hit(r))
            group.requests = [r for r in group.requests if not hit(r)]
        self._pending = deque(g for g in self._pending if g.requests)
        stopped = {i for i, row in enumerate(self._rows) if hit(row.request)}
        if stopped:
            for i in stopped:
                out.append(self._completion(self._rows[i], "abort"))
            source = self._compact(stopped)
            self._logits = self._logits[source] if self._rows else torch.empty(0, 0)
        return out

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row, each row with its own request's sampling settings and seed."""
        return sample_rows(logits, [(r.request.sampling.temperature, r.request.sampling.top_p) for r in rows],
                           [r.request.seed for r in rows], [r.request.offset + len(r.tokens) for r in rows])

    def _ensure_cache(self, slots: int, capacity: int) -> SlotKV:
        """The engine's cache, regrown (live rows copied over) when it needs more rows or positions.

        Positions grow geometrically (x2, in steps of 256): a multi-turn rollout's context grows every
        turn, and memory is touched only as positions are used (see `SlotKV`), so headroom is free.
        """
        old = self._kv
        if old is not None and old.slots >= slots and old.capacity >= capacity:
            return old
        if old is not None:
            slots = max(slots, old.slots)
            capacity = old.capacity if old.capacity >= capacity else max(capacity, old.capacity * 2)
        new = self.decoder.new_cache(slots, -(-capacity // 256) * 256)
        if old is not None and self._rows:
            new.copy_rows(old, len(self._rows), old.clean)
        self._kv = new
        return new

    def _admit(self) -> torch.Tensor | None:
        """Prefill the waiting groups that fit into free rows; return the logits of the new rows."""
        admitted: list[tuple[_Group, int, int]] = []  # group, first row, reused prefix length
        free = self.batch_size - len(self._rows)
        wanted = min(self.batch_size, len(self._rows) + sum(len(g.requests) for g in self._pending))
        while self._pending and len(self._pending[0].requests) <= free:
            group = self._pending.popleft()
            longest = max(r.sampling.max_new_tokens for r in group.requests)
            kv = self._ensure_cache(wanted, len(group.prompt) + longest + 2)  # +1 fed token, +1 padding sink
            first = len(self._rows)
            reused, cached = self.prefixes.longest_prefix(group.prompt, limit=len(group.prompt) - 1)
            if cached is not None:
                kv.load(first, cached)
            self._rows.extend(_Row(r, len(group.prompt), group.prompt) for r in group.requests)
            admitted.append((group, first, reused))
            free -= len(group.requests)
        if not admitted:
            return None
        kv = self._kv
        t0 = time.perf_counter()
        heads = []
        for chunk in self._prefill_chunks(admitted):
            heads.append(self._prefill(kv, chunk))
        head_logits = torch.cat(heads)
        out = []
        for (group, first, _), logit in zip(admitted, head_logits):
            for row in range(first + 1, first + len(group.requests)):
                kv.move(first, row, len(group.prompt))
            out.append(logit.expand(len(group.requests), -1))
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

    def _record(self, rows: list[_Row], tokens: list[int], logprobs: list[float]) -> set[int]:
        """Append each row's sampled token; return the rows that just finished."""
        done = set()
        for i, (row, tok, lp) in enumerate(zip(rows, tokens, logprobs)):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            sp = row.request.sampling
            if tok in self.eos_ids or hit_stop(self.tokenizer, row.request, row.tokens):
                row.finish_reason = "stop"
            if row.finish_reason == "stop" or len(row.tokens) >= sp.max_new_tokens:
                done.add(i)
        self.stats.generated_tokens += len(rows)
        return done

    def _retire(self, done: set[int]) -> tuple[list[Completion], list[int]]:
        """Turn finished rows into completions and keep their K/V; return them and the packing map
        (for each live row after packing, the index it had before)."""
        finished = []
        for i in sorted(done):
            row = self._rows[i]
            finished.append(self._completion(row, row.finish_reason))
            if self.prefixes.max_bytes > 0:
                self.prefixes.put(row.prompt + row.tokens[:-1], self._kv.export(i, row.length))
        return finished, self._compact(done)

    def _compact(self, removed: set[int]) -> list[int]:
        """Drop rows `removed`, moving the last live rows (and their K/V) into the holes; return the map
        from each remaining row to the index it had before."""
        rows = self._rows
        live = len(rows) - len(removed)
        holes = [i for i in sorted(removed) if i < live]
        movers = [i for i in range(live, len(rows)) if i not in removed]
        source = list(range(len(rows)))
        for hole, mover in zip(holes, movers):
            self._kv.move(mover, hole, rows[mover].length)
            rows[hole] = rows[mover]
            source[hole] = mover
        del rows[live:]
        return source[:live]

    def _completion(self, row: _Row, reason: str) -> Completion:
        return Completion(
            prompt_index=0, prompt_ids=list(row.prompt), token_ids=row.tokens, logprobs=row.logprobs,
            text=self.tokenizer.decode(row.tokens, skip_special_tokens=True), finish_reason=reason,
            policy_version=self.version, request_id=row.request.id,
        )
