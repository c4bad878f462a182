"""The local backend: every role in this process (the default on one machine).

The learner trains in a thread of its own and each rollout worker runs its loop in another, so in
asynchronous mode rollout goes on while the learner trains (torch releases the GIL in its kernels;
env calls wait on I/O). Roles are the same classes the Ray backend runs as actors.
"""

from __future__ import annotations

import time
from dataclasses import replace
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rollmill.config import RunConfig
from rollmill.runtime.learner import Learner
from rollmill.runtime.worker import RolloutWorker, wait_for_update
from rollmill.types import GroupSpec, Trajectory


def assign(specs: list[GroupSpec], workers: int, replicate: bool, start: int) -> list[list[GroupSpec]]:
    """Which worker runs what: whole groups round-robin from worker `start`, or with `replicate` each
    group's samples spread over all workers (prompt replication)."""
    out: list[list[GroupSpec]] = [[] for _ in range(workers)]
    for k, spec in enumerate(specs):
        if not replicate or workers == 1:
            out[(start + k) % workers].append(spec)
            continue
        for w in range(workers):
            part = spec.indices[w::workers]
            if part:
                out[w].append(replace(spec, indices=part))
    return out


def add_loads(loads: list[dict[str, int] | None]) -> dict[str, int] | None:
    """The workers' engine counters summed (None when no engine counts them)."""
    loads = [x for x in loads if x is not None]
    return {k: sum(x[k] for x in loads) for k in loads[0]} if loads else None


class LocalRoles:
    """The learner and `runtime.rollout_workers` rollout workers, in this process."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.learner = Learner(cfg)
        self.workers = [RolloutWorker(cfg, i) for i in range(cfg.runtime.rollout_workers)]
        self._training = ThreadPoolExecutor(1, thread_name_prefix="learner")  # one thread: calls run in order
        self._streamed: list[Future] = []
        self._turn = 0

    def train(self, groups: list[list[Trajectory]], step: int) -> Future:
        return self._training.submit(self.learner.train, groups)

    def begin_stream(self) -> None:
        self._streamed = [self._training.submit(self.learner.begin_stream)]

    def stream(self, groups: list[list[Trajectory]]) -> None:
        self._streamed.append(self._training.submit(self.learner.add_groups, groups))

    def finish_stream(self, step: int) -> Future:
        """The streamed update's handle; it fails if any of its parts did (they ran first, in order)."""
        parts, self._streamed = self._streamed, []

        def finish():
            for part in parts:
                part.result()
            return self.learner.finish_stream()

        return self._training.submit(finish)

    def done(self, handle: Future) -> bool:
        return handle.done()

    def result(self, handle: Future) -> dict:
        return handle.result()

    def publish(self, version: int, wait: bool) -> float:
        """Send the learner's weights to every worker as `version`; with `wait`, block until they serve
        them (a copy is sent otherwise, since the learner goes on updating its own)."""
        t0 = time.perf_counter()
        state = self.learner.weights() if wait else self.learner.snapshot()
        updates = [w.update_weights(state, version) for w in self.workers]
        if wait:
            for w, update in zip(self.workers, updates):
                wait_for_update(update, w.engine.name, version, self.cfg.rollout.weight_sync_timeout_s)
        return time.perf_counter() - t0

    def submit(self, specs: list[GroupSpec], lockstep: bool) -> None:
        for worker, part in zip(self.workers, assign(specs, len(self.workers), self.cfg.async_.prompt_replication,
                                                     self._turn)):
            if part:
                worker.submit(part, lockstep)
        self._turn += len(specs)

    def poll(self, timeout: float, step: int) -> list[Trajectory]:
        out = []
        for w in self.workers:
            out.extend(w.poll(timeout / len(self.workers)))
        return out

    def cancel(self, group_ids: list[int]) -> None:
        for w in self.workers:
            w.cancel(group_ids)

    def engine_load(self) -> dict[str, int] | None:
        return add_loads([w.engine_load() for w in self.workers])

    def truncate(self, group_ids: list[int]) -> None:
        for w in self.workers:
            w.truncate(group_ids)

    def evaluate(self, specs: list[GroupSpec], version: int) -> list[Trajectory]:
        return self.workers[0].evaluate(specs, version)

    def save(self, ckpt_root: Path, step: int, state: dict, keep: int, files: dict[str, bytes]) -> Path:
        return self.learner.save(ckpt_root, step, state, keep, files)

    def load(self, path: Path) -> dict:
        return self.learner.load(path)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self._training.shutdown(wait=True)
