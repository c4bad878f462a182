"""The RL job: the driver that wires rollout workers, the sample queue and the learner, step by step.

Synchronous (`async.max_staleness: 0`): a step launches its groups as one wave with the current
weights, waits for them (and for dynamic sampling's refill rounds), trains, and publishes the new
weights before the next wave starts: the lockstep algorithm, sample for sample.

Tail batching (`tail_batching.enabled`): a short round launches more groups and samples than the
step needs and trains the first to finish; the groups it cuts off wait in the queue's long-prompt
queue, and once that holds a step's worth a long round runs them (synchronously: as the next step;
asynchronously: launched ahead of new prompts). A long round that runs past its time limit ends its
samples where they are (`truncate`: their tokens are kept, finish reason "length").

Streamed training (`runtime.streamed_training`, synchronous): each group goes to the learner as it
completes, which runs its forward/backward while the rest of the step is still sampled; the step's
batch is then exactly the groups streamed.

Asynchronous (k > 0): workers keep up to k + 1 steps' worth of groups in flight; the queue hands the
learner the oldest ready groups within the staleness bound, and while the learner trains the driver
keeps collecting and launching. Weights are published without waiting; workers load them between
engine steps (partial rollouts, `async.partial_rollout`).
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

from rollmill.config import ConfigError, RunConfig
from rollmill.models import load_tokenizer
from rollmill.pipelines import PIPELINES
from rollmill.pipelines.common import spread
from rollmill.runtime.learner import streaming_blockers
from rollmill.runtime.queue import SampleQueue, StepData
from rollmill.train.checkpoint import newest_readable
from rollmill.types import GroupSpec

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.pkl"


class RLJob:
    """One RL run's driver; `roles` is the backend's handle on the learner and the rollout workers."""

    def __init__(self, cfg: RunConfig, run_dir: Path, roles):
        self.cfg = cfg
        self.run_dir = run_dir
        self.pipeline = PIPELINES[cfg.pipeline]
        self.headline = self.pipeline.headline
        self.source = self.pipeline.source(cfg)  # bad data fails before any model loads
        self.streaming = cfg.runtime.streamed_training
        if self.streaming and (reasons := streaming_blockers(cfg)):
            raise ConfigError("runtime.streamed_training: this config's update has no streamed form: " + "; ".join(reasons))
        self._streamed: list[int] = []  # this step's groups the learner already has
        self.tokenizer = load_tokenizer(cfg.model)
        self.queue = SampleQueue(cfg, self.pipeline.drop_failed_groups)
        self.roles = roles(cfg)
        self.sync = cfg.async_.max_staleness == 0
        self._long_started: float | None = None  # when the long round in flight was launched
        self._step_s: list[float] = []  # wall time of each step so far: the long-round time limit's unit
        self.step = 0
        self.published = 0  # the weights version the rollout workers were last sent
        self._restart: list[GroupSpec] = []
        self._all_failed_streak = 0
        self._last_error = ""

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict, list[dict]]:
        t0 = time.perf_counter()
        load0 = self.roles.engine_load()
        data, rounds = self._collect_sync() if self.sync else (self._collect_async(), None)
        t_rollout = time.perf_counter() - t0
        if not data.groups:
            log.warning("step %d: no group to train on (all filtered or dropped); no update this step", self.step + 1)
        if self.streaming:
            handle = self.roles.finish_stream(self.step + 1)
        else:
            handle = self.roles.train(data.groups, self.step + 1)
        while not self.sync and not self.roles.done(handle):
            self._launch(self.queue.capacity(self.published, self.step + 1))  # rollout runs on while the learner trains
            self._poll()
        metrics = self.roles.result(handle)
        t_train = time.perf_counter() - t0 - t_rollout
        self.step += 1
        t_sync = self.roles.publish(self.step, wait=self.sync)
        self.published = self.step
        trajs = [t for g in data.sampled for t in g]
        self.pipeline.log_failures(self.step, trajs)
        if any(t.failed for t in trajs):
            self._last_error = next(t.error for t in trajs if t.failed) or ""
        record = {"step": self.step, **self.pipeline.rollout_metrics(data.sampled), **metrics}
        if self.cfg.filters.dynamic_sampling:
            record["filter/kept_groups"] = len(data.groups)
            record["filter/sampled_groups"] = len(data.sampled)
            if rounds is not None:
                record["filter/refill_rounds"] = rounds
        if not self.sync:
            record.update(data.counts)
            record["async/groups_in_flight"] = float(len(self.queue.inflight))
        if self.queue.tail:
            record.update(self._tail_metrics(data))
        self._step_s.append(time.perf_counter() - t0)
        if load0 is not None:
            record.update(_occupancy(load0, self.roles.engine_load()))
        tokens = sum(t.sampled_tokens for t in trajs)
        record.update({"time/step_s": self._step_s[-1], "time/rollout_s": t_rollout, "time/train_s": t_train,
                       "time/sync_s": t_sync,
                       "throughput/tokens_per_s": tokens / (t_rollout + t_train),
                       "throughput/trained_samples_per_s": sum(len(g) for g in data.groups) / (time.perf_counter() - t0)})
        samples = [self.pipeline.sample_dump(trajs[i], self.tokenizer) for i in spread(len(trajs), self.cfg.log.samples_per_step)]
        return record, samples

    def _tail_metrics(self, data: StepData) -> dict[str, float]:
        """Which round this step was, what it deferred, and its response lengths (to compare round types)."""
        lengths = sorted(t.sampled_tokens for g in data.groups for t in g) or [0]
        counts = data.counts
        return {"tail/long_round": float(counts.get("tail/long_groups", 0.0) > 0),
                "tail/long_queue": float(len(self.queue.long)),
                "tail/deferred_prompts": counts.get("tail/deferred_prompts", 0.0),
                "tail/truncated_long_rounds": counts.get("tail/truncated_long_rounds", 0.0),
                "tail/response_length_p90": float(lengths[int(0.9 * (len(lengths) - 1))]),
                "tail/response_length_max": float(lengths[-1])}

    def _collect_sync(self) -> tuple[StepData, int]:
        """One wave with the current weights (a tail-batching long round: the deferred groups), then
        dynamic sampling's refill rounds, then the batch."""
        want, rounds = self.cfg.rollout.prompts_per_step, 0
        if self.streaming:
            self.roles.begin_stream()
            self._streamed = []
        deferred = self.queue.long_round()
        if deferred:
            self._submit(deferred, long=True)
        else:
            self._launch(want + self.queue.extra_groups)
        while True:
            while self.queue.inflight and len(self.queue.ready) < want:
                self._poll()
            if self.queue.inflight:  # the step is full: the extra groups still running are not needed
                self.roles.cancel(self.queue.abandon())
            if len(self.queue.ready) >= want or not self.cfg.filters.dynamic_sampling or \
                    rounds >= self.cfg.filters.max_refill_rounds:
                if not self.streaming:
                    return self.queue.take(self.step, force=True), rounds
                self._stream_ready()
                return self.queue.take(self.step, force=True, ids=self._streamed), rounds
            rounds += 1
            self._launch(self.queue.refill())

    def _collect_async(self) -> StepData:
        while True:
            self._launch(self.queue.capacity(self.published, self.step))
            data = self.queue.take(self.step)
            if data is not None:
                if self.queue.tail:  # groups that can train in no later update wait for a long round
                    late = self.queue.overdue(self.step + 1)
                    self.queue.defer(late)
                    self.roles.cancel(late)
                return data
            self._poll()

    def _launch(self, count: int) -> None:
        if count <= 0:
            return
        if not self.sync and count >= self.cfg.rollout.prompts_per_step and not self.queue.long_inflight:
            deferred = self.queue.long_round()  # asynchronous tail batching: a long round goes first
            if deferred:
                self._submit(deferred, long=True)
                count -= len(deferred)
        again, self._restart = self._restart[:count], self._restart[count:]
        self._submit(again + self.source.next_groups(count - len(again), self.queue.samples_per_group))

    def _submit(self, specs: list[GroupSpec], long: bool = False) -> None:
        if not specs:
            return
        self.queue.launched(specs, self.published, long)
        self.roles.submit(specs, lockstep=self.cfg.lockstep)
        if long:
            self._long_started = time.perf_counter()

    def _limit_long_round(self) -> None:
        """End the long round's samples where they are once it has run `tail_batching.long_round_time_limit`
        times the mean step time (a generous bound: it only stops a pathological tail)."""
        factor = self.cfg.tail_batching.long_round_time_limit
        if self._long_started is None or not factor or not self._step_s:
            return
        if time.perf_counter() - self._long_started > factor * sum(self._step_s) / len(self._step_s):
            self._long_started = None
            self.roles.truncate(self.queue.long_inflight)
            self.queue.count("tail/truncated_long_rounds")

    def _poll(self) -> None:
        if not self.queue.long_inflight:
            self._long_started = None
        self._limit_long_round()
        complete = [gid for t in self.roles.poll(self.cfg.runtime.poll_s, self.step + 1)
                    if (gid := self.queue.add(t)) is not None]
        if complete and self.queue.samples_per_group > self.cfg.rollout.group_size:
            self.roles.cancel(complete)  # redundant samples still running
        if self.streaming:
            self._stream_ready()

    def _stream_ready(self) -> None:
        """Send the learner the groups completed since the last call, up to the step's batch, in the
        order they completed."""
        room = self.cfg.rollout.prompts_per_step - len(self._streamed)
        fresh = [gid for gid in self.queue.ready if gid not in self._streamed][:room]
        if fresh:
            self.roles.stream([self.queue.ready[gid] for gid in fresh])
            self._streamed.extend(fresh)

    # -- evaluation, health, checkpoints ----------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out metrics with the weights of the current step."""
        specs = self.source.eval_groups(self.cfg.eval.n)
        trajs = self.roles.evaluate(specs, self.step)
        groups = [[t for t in trajs if t.group_id == s.group_id] for s in specs]
        self.pipeline.log_failures(self.step, trajs, where="held-out ")
        return self.pipeline.eval_metrics(groups)

    def check_health(self, record: dict) -> None:
        """Stop when every sample fails for several steps: that is a bug (a broken reward or env), not bad luck."""
        p = self.pipeline
        all_failed = record[p.failed_key] == record[p.samples_key]
        self._all_failed_streak = self._all_failed_streak + 1 if all_failed else 0
        if self._all_failed_streak >= self.cfg.reward.max_all_failed_steps:
            raise RuntimeError(p.all_failed_message.format(steps=self._all_failed_streak, error=self._last_error))

    def save(self, extra: dict) -> Path:
        state = {**extra, "source": self.source.state()}
        queue = self.queue.state()
        queue["restart"] = self._restart + queue["restart"]
        return self.roles.save(self.run_dir / "checkpoints", self.step, state, self.cfg.checkpoint.keep,
                               {QUEUE_FILE: pickle.dumps(queue)})

    def resume(self) -> dict | None:
        found = newest_readable(self.run_dir / "checkpoints", self._read_checkpoint)
        if found is None:
            return None
        ckpt, (state, queue) = found
        self.step = state["step"]
        self.source.load_state(state["source"])
        if queue is not None:
            self._restart = self.queue.load_state(queue)
        self.roles.publish(self.step, wait=True)
        self.published = self.step
        log.info("resumed from %s (step %d)", ckpt, self.step)
        return state

    def _read_checkpoint(self, ckpt: Path) -> tuple[dict, dict | None]:
        """The learner's state restored from `ckpt`, and the sample queue's saved state (None in older checkpoints)."""
        state = self.roles.load(ckpt)
        return state, pickle.loads((ckpt / QUEUE_FILE).read_bytes()) if (ckpt / QUEUE_FILE).is_file() else None

    def close(self) -> None:
        self.roles.close()



def _occupancy(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """How full the engines ran this step: mean rows per decode step, and rows decoded over the row
    slots the decode steps offered (the batch size each); a long tail shows as a low figure."""
    rows, steps, slots = (after[k] - before[k] for k in ("rows", "steps", "slots"))
    return {"engine/rows_per_step": rows / max(steps, 1), "engine/occupancy": rows / max(slots, 1)}
