"""The scheduling policies: which groups start when, which train in which update, which are dropped or
deferred. Each driver reacts to three calls from the simulation: `start`, `group_complete(g)` (G of
g's samples finished; its other samples are already cancelled) and `learner_done` (an update and its
weight sync are over; `sim.version` is the new version). Update u trains on weights version u."""

from __future__ import annotations

from collections import deque

from rollmill.simulate.model import ceil_factor


class Sync:
    """Launch P groups (G + redundant samples each) on the current weights, wait for all of them, train,
    sync, repeat."""

    def __init__(self, sim):
        self.sim = sim
        self.round: list = []
        self.done = 0

    def start(self) -> None:
        sim = self.sim
        self.round = [sim.launch(sim.new_prompt(), sim.w.group_size + sim.policy.redundant)
                      for _ in range(sim.w.prompts)]
        self.done = 0

    def group_complete(self, g) -> None:
        self.done += 1
        if self.done == len(self.round):
            self.sim.train(self.round)

    def learner_done(self) -> None:
        self.start()


class Async:
    """Bounded staleness k (rollmill's SampleQueue rules): groups may start while
    `(version + k - next_update + 1) x P` exceeds the groups in flight or ready, so rollout runs up to
    k + 1 steps' worth ahead while the learner waits and k while it trains. The learner takes the P
    oldest ready groups as soon as it is free and P are ready; a group launched on version v may train
    in updates up to v + k, older ones are dropped at that moment (counted as stale) and replaced."""

    def __init__(self, sim):
        self.sim = sim
        self.inflight: dict = {}  # group id -> group
        self.ready: list = []
        self.next_update = 0  # the update that takes the next batch
        self.extra_groups = 0
        self.samples = sim.w.group_size + sim.policy.redundant

    def start(self) -> None:
        self._fill()

    def group_complete(self, g) -> None:
        del self.inflight[g.gid]
        self.ready.append(g)
        self._take()
        self._fill()

    def learner_done(self) -> None:
        self._fill()
        self._take()

    def _budget(self) -> int:
        sim = self.sim
        steps = sim.version + sim.policy.k - self.next_update + 1
        return steps * sim.w.prompts + self.extra_groups - len(self.inflight) - len(self.ready)

    def _fill(self) -> None:
        self._launch([self.sim.new_prompt() for _ in range(self._budget())], self.samples)

    def _launch(self, prompts: list, n: int) -> list:
        groups = [self.sim.launch(prompt, n) for prompt in prompts]
        self.inflight.update((g.gid, g) for g in groups)
        return groups

    def _take(self) -> None:
        sim, p = self.sim, self.sim.w.prompts
        if sim.learner_busy:
            return
        oldest = self.next_update - sim.policy.k  # the oldest weights update next_update may train on
        for g in [g for g in self.ready if g.version < oldest]:
            self._expire(g)
        self.ready = [g for g in self.ready if g.version >= oldest]
        if len(self.ready) < p or self._waits():
            self._fill()  # replacements for the expired groups
            return
        self.ready.sort(key=lambda g: (g.version, g.gid))  # earliest deadline first
        batch, self.ready = self.ready[:p], self.ready[p:]
        self.next_update += 1
        self._after_take()
        sim.train(batch)
        self._fill()

    def _expire(self, g) -> None:
        self.sim.count("stale")

    def _waits(self) -> bool:
        """Whether the learner must wait although P groups are ready."""
        return False

    def _after_take(self) -> None:
        pass


class Tail:
    """Tail batching (RollPacker), synchronous. A short round launches ceil(P x prompt_factor) new
    prompts with ceil(G x sample_factor) samples each; a group is complete when G of its samples
    finish; once P groups are complete the round ends: they train, and the groups still running are
    aborted and their prompts wait in the long-prompt queue. When that queue holds P prompts the next
    round is a long round: those P prompts, sampled afresh with G samples each, all run to the end."""

    def __init__(self, sim):
        self.sim = sim
        self.long: deque = deque()  # deferred prompts, oldest first
        self.round: list = []
        self.complete: list = []

    def start(self) -> None:
        self._launch()

    def learner_done(self) -> None:
        self._launch()

    def group_complete(self, g) -> None:
        self.complete.append(g)
        if len(self.complete) == self.sim.w.prompts:
            self._end_round(self.complete)

    def _launch(self) -> None:
        sim, p, size = self.sim, self.sim.w.prompts, self.sim.w.group_size
        if len(self.long) >= p:
            sim.count("long_rounds")
            prompts, n = [self.long.popleft() for _ in range(p)], size
        else:
            prompts = [sim.new_prompt() for _ in range(ceil_factor(p, sim.policy.prompt_factor))]
            n = ceil_factor(size, sim.policy.sample_factor)
        self.round = [sim.launch(prompt, n) for prompt in prompts]
        self.complete = []

    def _end_round(self, batch: list) -> None:
        """Train `batch`; the round's other groups are aborted and their prompts deferred."""
        taken = {g.gid for g in batch}
        for g in self.round:
            if g.gid not in taken:
                self.sim.abort(g)
                self.long.append(g.prompt)
                self.sim.count("deferred")
        self.sim.train(batch)


class Both(Async):
    """Tail batching under bounded staleness k (the runtime's asynchronous tail batching; k = 1 unless
    set). Groups start under the async budget plus ceil(P x prompt_factor) - P extra groups, with
    ceil(G x sample_factor) samples each. When the budget allows a step's worth, no long round is in
    flight and the long-prompt queue holds P prompts, a long round of those P (G samples each) starts
    first. At each update u: ready groups older than u - k go to the long-prompt queue; the update waits
    while a long-round group would be too old for any later update; it takes the P ready groups with
    the earliest deadline; then every short-round group still running that could not train in update
    u + 1 either is aborted and deferred to the long-prompt queue instead of going stale."""

    def __init__(self, sim):
        super().__init__(sim)
        self.long: deque = deque()
        self.long_round: set = set()  # ids of the long round's groups still in flight
        self.long_version = 0  # the weights the long round in flight was launched on
        self.extra_groups = ceil_factor(sim.w.prompts, sim.policy.prompt_factor) - sim.w.prompts
        self.samples = ceil_factor(sim.w.group_size, sim.policy.sample_factor)

    def group_complete(self, g) -> None:
        self.long_round.discard(g.gid)
        super().group_complete(g)

    def _fill(self) -> None:
        sim, budget = self.sim, self._budget()
        if budget >= sim.w.prompts and not self.long_round and len(self.long) >= sim.w.prompts:
            sim.count("long_rounds")
            prompts = [self.long.popleft() for _ in range(sim.w.prompts)]
            self.long_round = {g.gid for g in self._launch(prompts, sim.w.group_size)}
            self.long_version = sim.version
            budget -= sim.w.prompts
        self._launch([sim.new_prompt() for _ in range(budget)], self.samples)

    def _expire(self, g) -> None:
        self.long.append(g.prompt)
        self.sim.count("deferred")

    def _waits(self) -> bool:
        return bool(self.long_round) and self.long_version + self.sim.policy.k <= self.next_update

    def _after_take(self) -> None:
        late = self.next_update - self.sim.policy.k  # launched before this: too old for the next update
        for g in [g for g in self.inflight.values() if g.version < late and g.gid not in self.long_round]:
            del self.inflight[g.gid]
            self.sim.abort(g)
            self._expire(g)


DRIVERS = {"sync": Sync, "async": Async, "tail": Tail, "both": Both}
