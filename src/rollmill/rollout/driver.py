"""Running an engine under asyncio: many episodes await their own completions, one thread steps the engine.

Episodes (an RLVR sample, a multi-turn agent episode) are coroutines that `await driver.generate(request)`.
The driver hands new requests to the engine between steps and resolves each episode's future when
its completion finishes, so the engine batches whatever turns are ready across episodes (continuous
batching across episodes); every engine call runs in one dedicated thread, so the engine is never
touched concurrently and the event loop stays free for env calls while the engine computes.

Two policies live here:
- **Lockstep waves.** Requests that name a `Wave` are held until every live member of the wave has
  asked (or left), then submitted together in member order. This is the synchronous agent loop (all
  episodes take turn t together) and makes a run reproducible batch for batch.
- **Weight updates with requests in flight** (partial rollouts): `continue` aborts running requests,
  loads the new weights and continues each from its partial output (`Request.offset`), so one
  completion may span versions (`Completion.versions` says which token came from which);
  `finish` stops admitting requests, lets the running ones end under the old weights, then loads.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Hashable

import torch

from rollmill.rollout.engine import Completion, Engine, Request

PARTIAL_MODES = ("continue", "finish")


class Wave:
    """Members that take each generation step together (lockstep): a request is released once every
    live member has asked or left."""

    def __init__(self, members: list[Hashable]):
        self.live = set(members)
        self._waiting: dict[Hashable, tuple[Request, asyncio.Future, Hashable]] = {}
        self._release = None  # set by the driver: where a full step goes

    def _arrive(self, member: Hashable, request: Request, future: asyncio.Future, tag: Hashable = None) -> None:
        if member not in self.live:
            raise ValueError(f"{member!r} is not a live member of this wave")
        self._waiting[member] = (request, future, tag)
        self._maybe_release()

    def join(self, member: Hashable) -> None:
        """A member (back) in lockstep: from now on the others wait for its requests too."""
        self.live.add(member)

    def leave(self, member: Hashable) -> None:
        """A member ended (or failed): the others no longer wait for it."""
        self.live.discard(member)
        self._waiting.pop(member, None)
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._waiting and len(self._waiting) == len(self.live):
            ready = [self._waiting[m] for m in sorted(self._waiting)]
            self._waiting.clear()
            for request, future, tag in ready:
                self._release([(request, future)], tag)


@dataclass
class _Pending:
    request: Request  # as the episode asked
    future: asyncio.Future
    tag: Hashable = None  # what `truncate` selects by (a rollout worker tags requests with their group id)
    pieces: list[Completion] = field(default_factory=list)  # partial outputs under earlier versions


@dataclass
class DriverStats:
    """Counters since the driver started: engine steps, occupancy, partial rollouts."""

    steps: int = 0
    busy_s: float = 0.0
    continued: int = 0  # requests aborted by a weight update and continued under the new weights
    weight_updates: int = 0


def _engine_thread(threads: int | None, low_priority: bool) -> None:
    """Set up the thread every engine call runs in. Torch thread counts and Linux niceness are per
    thread, and the compute threads torch starts from this one inherit both."""
    if threads:
        torch.set_num_threads(threads)
    if low_priority:
        os.nice(19)


class EngineDriver:
    """Serves `generate` coroutines from one engine; create it inside the event loop it serves."""

    def __init__(self, engine: Engine, partial: str = "continue", threads: int | None = None,
                 low_priority: bool = False):
        if partial not in PARTIAL_MODES:
            raise ValueError(f"partial rollout mode {partial!r}; allowed: {PARTIAL_MODES}")
        self.engine = engine
        self.partial = partial
        self.stats = DriverStats()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{getattr(engine, 'name', 'x')}",
                                          initializer=_engine_thread, initargs=(threads, low_priority))
        self._pending: dict[Hashable, _Pending] = {}
        self._outbox: list[Request] = []  # requests to hand to the engine at the next step
        self._aborts: set = set()  # requests to stop at the next step (their episodes were cancelled)
        self._cuts: set = set()  # requests to end at the next step with what they sampled (`truncate`)
        self._hold = False  # `finish` mode: an update is waiting for the running requests to end
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._counter = 0
        self._task = asyncio.get_running_loop().create_task(self._pump())

    @property
    def version(self) -> int:
        return self.engine.version

    def wave(self, members: list[Hashable]) -> Wave:
        wave = Wave(members)
        wave._release = self._release
        return wave

    async def generate(self, request: Request, wave: Wave | None = None, member: Hashable = None,
                       tag: Hashable = None) -> Completion:
        """The completion of `request` (with per-token `versions`); in lockstep when `wave` is given.
        `tag` marks the request for `truncate`."""
        if self._failure is not None:
            raise RuntimeError("the engine failed earlier") from self._failure
        self._counter += 1
        request = replace(request, id=(self._counter, request.id))
        future = asyncio.get_running_loop().create_future()
        if wave is None:
            self._release([(request, future)], tag)
        else:
            wave._arrive(member, request, future, tag)
        try:
            return await future
        except asyncio.CancelledError:  # the episode was cancelled: stop its request too
            self._withdraw(request.id)
            raise

    def _withdraw(self, key) -> None:
        if self._pending.pop(key, None) is None:
            return
        before = len(self._outbox)
        self._outbox = [r for r in self._outbox if r.id != key]
        if len(self._outbox) == before:  # already in the engine
            self._aborts.add(key)
            self._wake.set()

    def _release(self, ready: list[tuple[Request, asyncio.Future]], tag: Hashable = None) -> None:
        for request, future in ready:
            self._pending[request.id] = _Pending(request, future, tag)
            self._outbox.append(request)
        self._wake.set()

    def truncate(self, tags: set) -> None:
        """End the requests tagged with one of `tags` at the next engine step, each with what it sampled
        so far and finish reason "length" (as if its budget ended there): the long tail stops and no
        sampled token is lost. Requests not yet in the engine end with no tokens."""
        self._cuts |= {key for key, p in self._pending.items() if p.tag in tags}
        self._wake.set()

    async def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load weights `version` with requests possibly in flight (see the module docstring)."""
        if self.partial == "finish":
            self._hold = True
            try:
                while not await self._call(self._update_if_idle, state, version):
                    self._idle.clear()
                    self._wake.set()
                    await self._idle.wait()
            finally:
                self._hold = False
                self._wake.set()
        else:
            partials = await self._call(self._abort_and_update, state, version)
            for piece in partials:
                self._continue(piece)
            self._wake.set()
        self.stats.weight_updates += 1

    def _update_if_idle(self, state, version) -> bool:
        if self.engine.busy:
            return False
        self.engine.update_weights(state, version)
        return True

    def _abort_and_update(self, state, version) -> list[Completion]:
        partials = self.engine.abort() if self.engine.busy else []
        self.engine.update_weights(state, version)
        return partials

    def _continue(self, piece: Completion) -> None:
        """Queue the rest of an aborted request under the new weights, keeping what it sampled."""
        pending = self._pending.get(piece.request_id)
        if pending is None:  # its episode was cancelled meanwhile
            return
        if piece.token_ids:
            pending.pieces.append(piece)
            self.stats.continued += 1
        done = sum(len(p.token_ids) for p in pending.pieces)
        original = pending.request
        sampled = tuple(t for p in pending.pieces for t in p.token_ids)
        self._outbox.append(replace(
            original, prompt_ids=original.prompt_ids + sampled, offset=original.offset + done,
            sampling=replace(original.sampling, max_new_tokens=original.sampling.max_new_tokens - done)))

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _step(self, new: list[Request], aborts: set, cuts: set) -> list[Completion]:
        if aborts:
            self.engine.abort(aborts)
        if new:
            self.engine.submit(new)
        ended = [replace(c, finish_reason="length") for c in self.engine.abort(cuts)] if cuts else []
        return ended + self.engine.step()

    async def _pump(self) -> None:
        while True:
            if not (self._outbox and not self._hold) and not self.engine.busy and not self._aborts and not self._cuts:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            new, self._outbox = ([], self._outbox) if self._hold else (self._outbox, [])
            aborts, self._aborts = self._aborts, set()
            cuts, self._cuts = self._cuts & self._pending.keys(), set()
            if self._hold:  # cut requests waiting in the outbox go to the engine now, to end at once
                new, self._outbox = [r for r in self._outbox if r.id in cuts], [r for r in self._outbox if r.id not in cuts]
            t0 = time.perf_counter()
            try:
                finished = await self._call(self._step, new, aborts, cuts)
            except BaseException as err:  # an engine failure fails every episode waiting on it
                self._failure = err
                for pending in self._pending.values():
                    if not pending.future.done():
                        pending.future.set_exception(RuntimeError(f"engine step failed: {err}"))
                self._pending.clear()
                return
            self.stats.steps += 1
            self.stats.busy_s += time.perf_counter() - t0
            for c in finished:
                self._finish(c)

    def _finish(self, last: Completion) -> None:
        pending = self._pending.pop(last.request_id, None)
        if pending is None or pending.future.done():  # cancelled meanwhile
            return
        pieces = pending.pieces + [last]
        tokens = [t for p in pieces for t in p.token_ids]
        whole = Completion(
            prompt_index=0, prompt_ids=list(pending.request.prompt_ids), token_ids=tokens,
            logprobs=[lp for p in pieces for lp in p.logprobs],
            text=last.text if len(pieces) == 1 else self.engine.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=last.finish_reason, policy_version=last.policy_version,
            versions=[p.policy_version for p in pieces for _ in p.token_ids], request_id=pending.request.id[1])
        pending.future.set_result(whole)

    async def close(self) -> None:
        self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
