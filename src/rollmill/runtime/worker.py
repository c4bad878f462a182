"""The rollout worker role: an engine, the pipeline's episodes and a reward client -> finished trajectories.

Built from the config alone (it loads its own copy of the policy; weights then arrive by value through
`update_weights`), so it runs the same in the driver's process or as a Ray actor. Inside, one asyncio
loop in a thread of its own runs every sample as a coroutine (`Episodes.run`), an `EngineDriver`
batches their replies, and finished trajectories wait in an outbox for `poll`. Every public method is
safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

import torch

from rollmill.config import RunConfig
from rollmill.models import load_model
from rollmill.models.device import role_device
from rollmill.pipelines import PIPELINES, EpisodeContext
from rollmill.rollout import build_engine
from rollmill.rollout.driver import DriverStats, EngineDriver
from rollmill.runtime.rewards import LocalRewards
from rollmill.types import GroupSpec, Trajectory


class WorkerFailure(RuntimeError):
    """An episode raised (a bug, not an env failure, which only fails its own sample)."""


class RolloutWorker:
    """Produces trajectories for the groups it is given, with the weights it was last given."""

    def __init__(self, cfg: RunConfig, worker_id: int = 0, rewards=None):
        self.cfg = cfg
        self.id = worker_id
        model, self.tokenizer = load_model(cfg.model)
        model.to(role_device(cfg, "rollout"))
        self.engine = build_engine(cfg.rollout, model, self.tokenizer)
        self.rewards = rewards or LocalRewards(cfg.reward, cfg.runtime.reward_workers)
        self.episodes = PIPELINES[cfg.pipeline].episodes(cfg, self.tokenizer)
        # the engine's thread sets its count explicitly: a new thread takes whatever count was set last
        self.threads = cfg.runtime.rollout.threads or torch.get_num_threads()
        self._outbox: queue.Queue = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"rollout-{worker_id}", daemon=True)
        self._thread.start()
        self._samples: _Samples = self._call(_Samples.start(self)).result()

    def _call(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    @property
    def version(self) -> int:
        return self.engine.version

    def submit(self, specs: list[GroupSpec], lockstep: bool) -> None:
        """Start every sample of `specs`; with `lockstep` they take each engine step together."""
        self._loop.call_soon_threadsafe(self._samples.launch, specs, lockstep)

    def poll(self, timeout: float) -> list[Trajectory]:
        """Trajectories finished since the last poll (waits up to `timeout` for the first one)."""
        out = []
        try:
            out.append(self._outbox.get(timeout=timeout))
            while True:
                out.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        for item in out:
            if isinstance(item, BaseException):
                raise WorkerFailure(f"rollout worker {self.id}: an episode raised: {item!r}") from item
        return out

    def cancel(self, group_ids: list[int]) -> None:
        """Stop the samples of these groups still running (redundant samples no longer needed)."""
        self._loop.call_soon_threadsafe(self._samples.cancel, list(group_ids))

    def truncate(self, group_ids: list[int]) -> None:
        """End the generations of these groups now with what they sampled (finish reason "length"): a
        time limit that keeps every token (the episodes then score and finish as usual)."""
        self._loop.call_soon_threadsafe(self._samples.driver.truncate, set(group_ids))

    def update_weights(self, state, version: int) -> Future:
        """Load weights `version` (running generations continue or finish per `async.partial_rollout`);
        the future resolves once they serve. `state` must stay unchanged until then."""
        return self._call(self._samples.driver.update_weights(state, version))

    def evaluate(self, specs: list[GroupSpec], min_version: int) -> list[Trajectory]:
        """Play the held-out `specs` in lockstep once the engine serves `min_version` or later."""
        return self._call(self._samples.evaluate(specs, min_version)).result()

    def stats(self) -> DriverStats:
        """The engine driver's counters: engine steps and busy time, partial rollouts continued."""
        return self._samples.driver.stats

    def engine_load(self) -> dict[str, int] | None:
        """The engine's decode counters: rows decoded, decode steps, and row slots offered (steps x batch
        size); None for an engine that does not count them. Deltas of these give occupancy."""
        stats = getattr(self.engine, "stats", None)
        if not hasattr(stats, "busy_row_steps"):
            return None
        return {"rows": stats.busy_row_steps, "steps": stats.steps, "slots": stats.steps * self.engine.batch_size}

    def close(self) -> None:
        self._call(self._samples.shutdown()).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self.episodes.close()
        self.rewards.close()


class _Samples:
    """The worker's side inside its event loop: one task per sample, the engine driver, the outbox.

    Kept apart from `RolloutWorker` so that class has no coroutine methods (Ray would otherwise run
    it as an async actor, on one event loop, where a blocking call would stall every other one)."""

    def __init__(self, worker: RolloutWorker, driver: EngineDriver):
        self.worker, self.driver = worker, driver
        self.tasks: dict[int, list[asyncio.Task]] = {}  # group id -> its running samples

    @classmethod
    async def start(cls, worker: RolloutWorker) -> _Samples:
        cfg = worker.cfg
        return cls(worker, EngineDriver(worker.engine, cfg.async_.partial_rollout, worker.threads,
                                        cfg.runtime.rollout_yields))

    def launch(self, specs: list[GroupSpec], lockstep: bool) -> None:
        members = [(s.group_id, i) for s in specs for i in s.indices]
        wave = self.driver.wave(members) if lockstep else None
        loop = asyncio.get_running_loop()
        for spec in specs:
            tasks = [loop.create_task(self.sample(spec, i, wave)) for i in spec.indices]
            self.tasks.setdefault(spec.group_id, []).extend(tasks)

    async def sample(self, spec: GroupSpec, index: int, wave) -> Trajectory | None:
        member = (spec.group_id, index)

        async def generate(request):
            return await self.driver.generate(request, wave, member, tag=spec.group_id)

        outbox = self.worker._outbox
        try:
            ctx = EpisodeContext(generate, self.worker.rewards.score)
            if wave is not None:
                ctx.step_out, ctx.step_in = (lambda: wave.leave(member)), (lambda: wave.join(member))
            traj = await self.worker.episodes.run(spec, index, ctx)
        except asyncio.CancelledError:
            return None
        except Exception as err:  # noqa: BLE001  a bug in episode code: the driver raises it
            if not spec.eval:
                outbox.put(err)
            raise
        finally:
            if wave is not None:
                wave.leave(member)
            if not spec.eval:
                self._forget(spec.group_id)
        traj.attempt = spec.attempt
        if not spec.eval:
            outbox.put(traj)
        return traj

    def _forget(self, group_id: int) -> None:
        tasks = self.tasks.get(group_id)
        if tasks is not None and all(t.done() or t is asyncio.current_task() for t in tasks):
            del self.tasks[group_id]

    def cancel(self, group_ids: list[int]) -> None:
        for gid in group_ids:
            for task in self.tasks.pop(gid, []):
                task.cancel()

    async def evaluate(self, specs: list[GroupSpec], min_version: int) -> list[Trajectory]:
        while self.driver.version < min_version:
            await asyncio.sleep(0.01)
        wave = self.driver.wave([(s.group_id, i) for s in specs for i in s.indices])
        return list(await asyncio.gather(*(self.sample(s, i, wave) for s in specs for i in s.indices)))

    async def shutdown(self) -> None:
        self.cancel(list(self.tasks))
        await asyncio.sleep(0)
        await self.driver.close()


def wait_for_update(future: Future, engine: str, version: int, timeout_s: float) -> float:
    """Block until a weight update is served; raise `WeightSyncError` naming the engine if it fails or
    takes longer than `timeout_s`. Returns the seconds it took."""
    from rollmill.rollout import WeightSyncError

    t0 = time.perf_counter()
    try:
        future.result(timeout=timeout_s)
    except TimeoutError:
        raise WeightSyncError(f"{engine} engine: weight update to version {version} did not finish within "
                              f"{timeout_s:g}s") from None
    except Exception as err:
        raise WeightSyncError(f"{engine} engine: weight update to version {version} failed: {err}") from err
    return time.perf_counter() - t0
