"""The event loop: rollout engines with continuous batching, one learner, and a clock.

An engine's batch only changes at a step boundary (a sample finishes, a new one is admitted, a
sample is cancelled, the cores' contention changes), and between two such boundaries every decode
step costs the same. So an engine jumps from boundary to boundary instead of ticking step by step:
it keeps `progress` (decode steps done by time `t_mark`) and each running sample finishes at a known
progress. A change that arrives mid-step takes effect at the engine's next step boundary, as in a
real engine. The policy (policies.py) only launches groups, aborts them and hands batches to the
learner; everything timed lives here."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque

from rollmill.simulate.model import LatencyModel, Policy, Result, Workload
from rollmill.simulate.policies import DRIVERS

WAITING, RUNNING, DONE, CANCELLED = range(4)  # a sample's state
OPEN, COMPLETE, ABORTED = range(3)  # a group's state


class Sample:
    __slots__ = ("sid", "group", "length", "engine", "state")

    def __init__(self, sid: int, group: Group, length: int, engine: Engine):
        self.sid, self.group, self.length, self.engine, self.state = sid, group, length, engine, WAITING


class Group:
    """One prompt's samples, launched together on weights `version`. `prompt` is (prompt id, the
    length model's prompt); `tokens` sums the lengths of its first G finished samples."""

    __slots__ = ("gid", "prompt", "version", "samples", "finished", "tokens", "state")

    def __init__(self, gid: int, prompt: tuple, version: int):
        self.gid, self.prompt, self.version = gid, prompt, version
        self.samples: list[Sample] = []
        self.finished = self.tokens = 0
        self.state = OPEN


class Engine:
    """One rollout engine: running rows as a heap of (finish progress, sample id, sample), and a FIFO of
    samples waiting for a free row. `step_s` is 0 while it does not decode (idle or paused)."""

    __slots__ = ("idx", "rows", "nrows", "dead", "waiting", "load", "progress", "t_mark", "step_s", "rows_now",
                 "token", "next_t", "decoding", "prefilled")

    def __init__(self, idx: int):
        self.idx = idx
        self.rows: list[tuple[int, int, Sample]] = []
        self.nrows = 0  # rows in the batch, cancelled ones included until the next boundary drops them
        self.dead = 0  # cancelled rows still in `rows`
        self.waiting: deque[Sample] = deque()
        self.load = 0  # live samples running or waiting: what assignment balances
        self.progress, self.t_mark, self.step_s, self.rows_now = 0, 0.0, 0.0, 0
        self.token, self.next_t, self.decoding = 0, None, False
        self.prefilled: set[int] = set()  # groups whose prompt this engine has prefilled (later samples reuse it)


class Sim:
    """One simulation run. Drivers call `new_prompt`, `launch`, `abort`, `train` and `count`, and read
    `version` (the published weights), `learner_busy` and `trained`."""

    def __init__(self, workload: Workload, latency: LatencyModel, lengths, policy: Policy, seed: int = 0):
        self.w, self.lat, self.lengths, self.policy = workload, latency, lengths, policy
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list[tuple[float, int, int, int]] = []  # (time, seq, engine index or -1 = learner, token)
        self._seq, self._gids, self._sids, self._pids = (itertools.count() for _ in range(4))
        self.engines = [Engine(i) for i in range(workload.engines)]
        self._loads = [(0, i) for i in range(workload.engines)]  # lazy heap of (load, engine index)
        self._decoding = 0  # engines with decode steps under way
        self.version = 0  # the published weights: also the number of updates done
        self.learner_busy = False
        self._work = self._rate = 0.0  # the update's remaining full-speed seconds, and its current speed
        self._rate_t = self._busy_since = self._busy_s = 0.0
        self._token = 0
        self.row_s = self.decode_steps = self.row_steps = 0.0  # integrals over every engine's decode steps
        self.counts = {"long_rounds": 0, "deferred": 0, "stale": 0}
        self.trained: list[int] = []  # prompt id of every trained group, in training order
        self._start = self._end = None
        self.driver = DRIVERS[policy.name](self)

    # -- what drivers call ------------------------------------------------------------------------
    def new_prompt(self) -> tuple:
        return next(self._pids), self.lengths.prompt(self.rng)

    def launch(self, prompt: tuple, n: int) -> Group:
        """Start `n` samples of `prompt` on the current weights, each on the least loaded engine."""
        g = Group(next(self._gids), prompt, self.version)
        for length in self.lengths.sample(prompt[1], n, self.rng):
            e = self._least_loaded()
            s = Sample(next(self._sids), g, max(1, int(length)), e)
            g.samples.append(s)
            e.waiting.append(s)
            self._set_load(e, e.load + 1)
            if e.nrows - e.dead < self.w.engine_batch_size:
                self._touch(e)
        return g

    def abort(self, g: Group) -> None:
        """Stop a group: its samples still waiting or running are cancelled, those finishing later ignored."""
        g.state = ABORTED
        self._cancel_samples(g)

    def train(self, groups: list[Group]) -> None:
        """The learner updates on `groups`, then publishes the next weights version."""
        self.trained.extend(g.prompt[0] for g in groups)
        tokens = sum(g.tokens for g in groups)
        self.learner_busy, self._busy_since = True, self.now
        self._work, self._rate_t = self.lat.update_s(len(groups) * self.w.group_size, tokens), self.now
        self._rate = 0.0  # no speed yet: the update below sets it and schedules the end
        self._update_learner_rate()
        self._cores_changed()

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    # -- the run ----------------------------------------------------------------------------------
    def run(self, steps: int, warmup: int = 0) -> Result:
        """Simulate until `steps` updates are published; figures cover the updates after `warmup`."""
        if not 0 <= warmup < steps:
            raise ValueError("need 0 <= warmup < steps")
        self.steps, self.warmup = steps, warmup
        if warmup == 0:
            self._start = self._snapshot()
        self.driver.start()
        while self._end is None:
            if not self._events:
                raise RuntimeError("the simulation stalled: nothing runs and no update can start")
            self.now, _, idx, token = heapq.heappop(self._events)
            if idx < 0:
                if token == self._token:
                    self._learner_done()
            elif token == self.engines[idx].token:
                self._boundary(self.engines[idx])
        return self._result()

    def _result(self) -> Result:
        (t0, r0, s0, rs0, b0, c0), (t1, r1, s1, rs1, b1, c1) = self._start, self._end
        span, steps = t1 - t0, self.steps - self.warmup
        return Result(policy=self.policy.name, steps=steps, step_s=span / steps,
                      s_per_sample=span / (steps * self.w.prompts * self.w.group_size),
                      occupancy=(r1 - r0) / (self.w.engines * self.w.engine_batch_size * span),
                      rows_per_step=(rs1 - rs0) / max(s1 - s0, 1e-12), learner_idle=1.0 - (b1 - b0) / span,
                      **{k: float(c1[k] - c0[k]) for k in c0})

    def _snapshot(self) -> tuple:
        """Time, the decode integrals, the learner's busy seconds and the counts, exactly as of now
        (engines account their steps at boundaries, so the part since each one's last is added)."""
        row_s, steps, row_steps = self.row_s, self.decode_steps, self.row_steps
        for e in self.engines:
            if e.step_s and self.now > e.t_mark:
                n = (self.now - e.t_mark) / e.step_s
                row_s, steps, row_steps = row_s + e.rows_now * n * e.step_s, steps + n, row_steps + n * e.rows_now
        busy = self._busy_s + (self.now - self._busy_since if self.learner_busy else 0.0)
        return self.now, row_s, steps, row_steps, busy, dict(self.counts)

    # -- engines ----------------------------------------------------------------------------------
    def _boundary(self, e: Engine) -> None:
        """Engine `e` reached a step boundary: account the steps since the last one, hand over the
        samples that finished, drop cancelled rows, admit waiting samples and schedule the next boundary."""
        if e.step_s:
            n = round((self.now - e.t_mark) / e.step_s)
            self.row_s += e.rows_now * e.step_s * n
            self.decode_steps += n
            self.row_steps += e.rows_now * n
            e.progress += n
        e.t_mark = self.now
        finished = []
        while e.rows and e.rows[0][0] <= e.progress:
            s = heapq.heappop(e.rows)[2]
            e.nrows -= 1
            if s.state == RUNNING:
                s.state = DONE
                finished.append(s)
                self._set_load(e, e.load - 1)
            else:
                e.dead -= 1
        for s in finished:
            self._sample_done(s)
        if e.dead:
            e.rows = [r for r in e.rows if r[2].state == RUNNING]
            heapq.heapify(e.rows)
            e.nrows, e.dead = len(e.rows), 0
        self._admit_and_schedule(e)

    def _admit_and_schedule(self, e: Engine) -> None:
        self._invalidate(e)
        slow = self._engine_slowdown()
        prefill = 0.0
        while slow and e.waiting and e.nrows < self.w.engine_batch_size:
            s = e.waiting.popleft()
            if s.state != WAITING:  # cancelled while it waited
                continue
            s.state = RUNNING
            heapq.heappush(e.rows, (e.progress + s.length, s.sid, s))
            e.nrows += 1
            if s.group.gid not in e.prefilled:  # a group's samples share one prefill (engines merge and cache prompts)
                e.prefilled.add(s.group.gid)
                prefill += self.w.prompt_tokens * self.lat.prefill_s_per_token
        if not slow or e.nrows == 0:
            e.step_s = 0.0
            self._set_decoding(e, False)
            return
        e.t_mark = self.now + prefill * slow  # the admitted prompts are prefilled before the next decode step
        e.step_s = self.lat.decode_step_s(e.nrows) * slow
        e.rows_now = e.nrows
        self._schedule(e, e.t_mark + (e.rows[0][0] - e.progress) * e.step_s)
        self._set_decoding(e, True)

    def _touch(self, e: Engine) -> None:
        """Something changed for `e` (a sample arrived or was cancelled, the cores' contention changed):
        make sure it has a boundary event at its next step boundary, where the change takes effect."""
        if e.step_s:
            t = e.t_mark + max(0, math.ceil((self.now - e.t_mark) / e.step_s - 1e-9)) * e.step_s
        elif self._engine_slowdown():
            t = max(self.now, e.t_mark)
        else:
            return  # paused: it resumes when the learner is done
        if e.next_t is None or e.next_t > t:
            self._invalidate(e)
            self._schedule(e, t)

    def _invalidate(self, e: Engine) -> None:
        e.token += 1
        e.next_t = None

    def _schedule(self, e: Engine, t: float) -> None:
        e.next_t = t
        heapq.heappush(self._events, (t, next(self._seq), e.idx, e.token))

    def _cancel_samples(self, g: Group) -> None:
        for s in g.samples:
            if s.state in (WAITING, RUNNING):
                e, running = s.engine, s.state == RUNNING
                s.state = CANCELLED
                self._set_load(e, e.load - 1)
                if running:
                    e.dead += 1
                    self._touch(e)

    def _sample_done(self, s: Sample) -> None:
        g = s.group
        if g.state != OPEN:  # a straggler of a complete or aborted group
            return
        g.finished += 1
        g.tokens += s.length
        if g.finished == self.w.group_size:
            g.state = COMPLETE
            self._cancel_samples(g)  # redundant samples still running
            self.driver.group_complete(g)

    def _set_load(self, e: Engine, load: int) -> None:
        e.load = load
        heapq.heappush(self._loads, (load, e.idx))
        if len(self._loads) > 8 * len(self.engines) + 64:  # drop the outdated entries now and then
            self._loads = [(x.load, x.idx) for x in self.engines]
            heapq.heapify(self._loads)

    def _least_loaded(self) -> Engine:
        while True:
            load, idx = self._loads[0]
            if self.engines[idx].load == load:
                return self.engines[idx]
            heapq.heappop(self._loads)

    # -- shared cores and the learner ----------------------------------------------------------------
    def _engine_slowdown(self) -> float:
        """An engine's step-time factor now; 0 = paused (rollout yields the cores to a busy learner)."""
        if not (self.w.shared_cores and self.learner_busy):
            return 1.0
        return 0.0 if self.policy.rollout_yields else self.lat.contention

    def _set_decoding(self, e: Engine, decoding: bool) -> None:
        if e.decoding != decoding:
            e.decoding = decoding
            self._decoding += 1 if decoding else -1
            self._update_learner_rate()

    def _update_learner_rate(self) -> None:
        """Reschedule the update's end when its speed changes (engines started or stopped decoding)."""
        if not self.learner_busy:
            return
        contended = self.w.shared_cores and not self.policy.rollout_yields and self._decoding > 0
        rate = 1.0 / self.lat.contention if contended else 1.0
        if rate == self._rate:
            return
        self._work -= (self.now - self._rate_t) * self._rate
        self._rate, self._rate_t = rate, self.now
        self._token += 1
        heapq.heappush(self._events, (self.now + self._work / rate, next(self._seq), -1, self._token))

    def _cores_changed(self) -> None:
        if self.w.shared_cores:
            for e in self.engines:
                if e.nrows or e.load:
                    self._touch(e)

    def _learner_done(self) -> None:
        self.learner_busy = False
        self._busy_s += self.now - self._busy_since
        self.version += 1
        if self.version == self.warmup:
            self._start = self._snapshot()
        if self.version == self.steps:
            self._end = self._snapshot()
            return
        self._cores_changed()
        self.driver.learner_done()


def simulate(workload: Workload, latency: LatencyModel, lengths, policy: Policy, steps: int = 20,
             warmup: int = 0, seed: int = 0) -> Result:
    """Predict `policy` on `workload`: run `steps` updates and report the figures of those after
    `warmup` (the first steps fill an asynchronous pipeline). Deterministic given `seed`."""
    return Sim(workload, latency, lengths, policy, seed).run(steps, warmup)
