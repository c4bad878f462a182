"""The Ray backend: the learner, the rollout workers and the reward workers as Ray actors.

The actors are the same classes the local backend runs in-process (`Learner`, `RolloutWorker`,
`RewardWorker`), each built from the config alone in its own process. The driver (this process) only
wires them: it holds the sample queue and calls the roles' methods remotely. Weights go from the
learner to the workers through Ray's object store, by value, with their version. `ray.init()` starts
a local head unless `runtime.ray_address` names a cluster to join; `runtime.learner/rollout/reward`
say what each actor asks for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from rollmill.config import RunConfig
from rollmill.models import load_tokenizer
from rollmill.rollout import WeightSyncError
from rollmill.runtime.learner import Learner
from rollmill.runtime.local import add_loads, assign
from rollmill.runtime.rewards import RewardWorker
from rollmill.runtime.worker import RolloutWorker
from rollmill.types import GroupSpec, Trajectory

log = logging.getLogger(__name__)


class RoleDied(RuntimeError):
    """An actor of the run died; the message names the role, the actor and the step."""


class _LearnerActor(Learner):
    """A learner in an actor: alone, or rank `rank` of `runtime.learner.ranks` data-parallel ranks, which
    build their Learner only in `join`, once the torch.distributed group they shard over exists."""

    def __init__(self, cfg: RunConfig, rank: int = 0):
        # Ray caps an actor's threads at its num_cpus; the run says how many (every core by default)
        torch.set_num_threads(cfg.runtime.learner.threads or os.cpu_count() or 1)
        self.rank = rank
        if cfg.runtime.learner.ranks == 1:
            super().__init__(cfg)

    def address(self) -> tuple[str, int]:
        """Where the group meets: this actor's node address and a port free on it (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, cfg: RunConfig, address: str, port: int) -> None:
        """Join the data-parallel group (every rank calls this at once), then build the learner in it."""
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and cfg.runtime.learner.num_gpus > 0 else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=cfg.runtime.learner.ranks)
        super().__init__(cfg)

    def publishable(self) -> dict[str, torch.Tensor]:
        """The weights, serialized into the object store by value when this call returns; host tensors
        (a no-op on CPU), so a worker on another device or node can load them."""
        return {name: t.detach().cpu() for name, t in self.weights().items()}


class _RolloutActor(RolloutWorker):
    def __init__(self, cfg: RunConfig, worker_id: int, rewards):
        torch.set_num_threads(cfg.runtime.rollout.threads or os.cpu_count() or 1)
        super().__init__(cfg, worker_id, rewards)

    def apply_weights(self, state, version: int) -> None:
        """Load weights `version` and return once they serve (the local backend's future, awaited here)."""
        self.update_weights(state, version).result()

    def engine_name(self) -> str:
        return self.engine.name


class RayRewards:
    """The rollout worker's reward client over reward-worker actors, taken in turn."""

    def __init__(self, actors: list):
        self.actors = actors
        self._turn = itertools.count()

    async def score(self, completion: str, example):
        actor = self.actors[next(self._turn) % len(self.actors)]
        return await asyncio.wrap_future(actor.score.remote(completion, example).future())

    def close(self) -> None:
        """The driver owns the actors."""


class RayRoles:
    """The learner, `runtime.rollout_workers` rollout workers and `runtime.reward_workers` reward workers as actors."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        load_tokenizer(cfg.model)  # convert a packaged model once here, not in several actors at the same time
        rt = cfg.runtime
        self._started = not ray.is_initialized()
        if self._started:
            needed = rt.learner.num_cpus + rt.rollout_workers * rt.rollout.num_cpus + rt.reward_workers * rt.reward.num_cpus
            cpus = os.cpu_count() or 1
            if rt.ray_address is None and needed > cpus:
                log.info("runtime: the roles ask for %.1f CPUs on a %d-CPU machine; the local Ray head offers %.1f",
                         needed, cpus, needed)
            ray.init(address=rt.ray_address, num_cpus=None if rt.ray_address else max(cpus, int(needed + 0.999)),
                     include_dashboard=False, log_to_driver=True, configure_logging=False)
        actor = ray.remote(_LearnerActor).options(**_resources(rt.learner))
        # the driver calls every rank the same way in the same order (each runs its calls one at a time),
        # so their collectives pair up; rank 0 is last, so a handle's last reference is the result
        self.learners = [actor.remote(cfg, rank) for rank in reversed(range(rt.learner.ranks))]
        self.learner = self.learners[-1]
        if rt.learner.ranks > 1:
            address, port = self._get(self.learner.address.remote(), "learner rank 0", 0)
            self._get([a.join.remote(cfg, address, port) for a in self.learners], "learner", 0)
        rewards = [ray.remote(RewardWorker).options(**_resources(rt.reward)).remote(cfg.reward)
                   for _ in range(rt.reward_workers)]
        self.rewards = rewards
        self.workers = [ray.remote(_RolloutActor).options(max_concurrency=4, **_resources(rt.rollout))
                        .remote(cfg, i, RayRewards(rewards)) for i in range(rt.rollout_workers)]
        self.engine = self._get(self.workers[0].engine_name.remote(), "rollout worker 0", 0)
        self._turn = 0
        self._streamed: list = []

    # -- calls on the actors ----------------------------------------------------------------------
    def _get(self, refs, role: str, step: int, timeout: float | None = None):
        try:
            return ray.get(refs, timeout=timeout)
        except RayActorError as err:
            raise RoleDied(f"{role} (Ray actor {getattr(err, 'actor_id', '?')}) died during step {step}: "
                           f"{str(err).splitlines()[0]}") from err

    def train(self, groups: list[list[Trajectory]], step: int):
        return ([a.train.remote(groups) for a in self.learners], step)

    def begin_stream(self) -> None:
        self._streamed = [self.learner.begin_stream.remote()]

    def stream(self, groups: list[list[Trajectory]]) -> None:
        self._streamed.append(self.learner.add_groups.remote(groups))

    def finish_stream(self, step: int):
        """The streamed update's handle: its parts' results too, so that a failed part is raised."""
        parts, self._streamed = self._streamed, []
        return (parts + [self.learner.finish_stream.remote()], step)

    def done(self, handle) -> bool:
        ready, _ = ray.wait([handle[0][-1]], timeout=0)
        return bool(ready)

    def result(self, handle) -> dict:
        return self._get(handle[0], "learner", handle[1])[-1]

    def publish(self, version: int, wait: bool) -> float:
        """The learner's weights into the object store once, then to every worker as `version`."""
        t0 = time.perf_counter()
        state = [a.publishable.remote() for a in self.learners][-1]  # every rank gathers; rank 0 holds them
        applied = [w.apply_weights.remote(state, version) for w in self.workers]
        if wait:
            timeout = self.cfg.rollout.weight_sync_timeout_s
            try:
                self._get(applied, "rollout worker", version, timeout=timeout)
            except GetTimeoutError:
                raise WeightSyncError(f"{self.engine} engine: weight update to version {version} did not finish "
                                      f"within {timeout:g}s") from None
        return time.perf_counter() - t0

    def submit(self, specs: list[GroupSpec], lockstep: bool) -> None:
        for worker, part in zip(self.workers, assign(specs, len(self.workers), self.cfg.async_.prompt_replication,
                                                     self._turn)):
            if part:
                worker.submit.remote(part, lockstep)
        self._turn += len(specs)

    def poll(self, timeout: float, step: int) -> list[Trajectory]:
        refs = [w.poll.remote(timeout / len(self.workers)) for w in self.workers]
        out = []
        for i, ref in enumerate(refs):
            out.extend(self._get(ref, f"rollout worker {i}", step))
        return out

    def cancel(self, group_ids: list[int]) -> None:
        for w in self.workers:
            w.cancel.remote(group_ids)

    def engine_load(self) -> dict[str, int] | None:
        return add_loads(self._get([w.engine_load.remote() for w in self.workers], "rollout worker", 0))

    def truncate(self, group_ids: list[int]) -> None:
        for w in self.workers:
            w.truncate.remote(group_ids)

    def evaluate(self, specs: list[GroupSpec], version: int) -> list[Trajectory]:
        return self._get(self.workers[0].evaluate.remote(specs, version), "rollout worker 0", version)

    def save(self, ckpt_root: Path, step: int, state: dict, keep: int, files: dict[str, bytes]) -> Path:
        return self._get([a.save.remote(ckpt_root, step, state, keep, files) for a in self.learners], "learner", step)[-1]

    def load(self, path: Path) -> dict:
        return self._get([a.load.remote(path) for a in self.learners], "learner", 0)[-1]

    def close(self) -> None:
        for actor in [*self.workers, *self.rewards, *self.learners]:
            ray.kill(actor)
        if self._started:
            ray.shutdown()


def _resources(role) -> dict:
    return {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus}
