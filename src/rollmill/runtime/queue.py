"""The sample queue: finished trajectories in, the next update's groups out.

Everything that decides *which* samples train lives here, not in the rollout call:
- **group completion**: a group is complete when G of its samples are in (with redundant rollouts,
  the first G to finish; failed samples of pipelines that drop them do not count) and so is its
  baseline sample if it has one (ReMax's greedy reply, index `BASELINE_INDEX`): that one never
  trains, its reward goes to the group's samples as info "baseline_reward";
- **filters**: DAPO's overlong shaping, then dynamic sampling (a group whose rewards do not vary is
  dropped the moment it completes, and a replacement is launched);
- **the staleness bound**: a group trains only if its oldest sampled token is at most k versions
  behind the weights being updated; older groups are dropped (and replaced);
- **how much may run ahead**: `capacity` says how many groups may start now;
- **tail batching**: groups a short round cut off wait in the long-prompt queue (`long`) until a
  long round takes them. Synchronously a round is cut once the step is full (`abandon`); under
  bounded staleness a group is cut once it can no longer train in time (`overdue`), and a batch
  waits for a long-round group at its last chance instead of letting it go stale.

Synchronous mode (k = 0) keeps the lockstep algorithm exactly: the driver launches a step's groups as
one wave and refills in rounds (`refill`); asynchronous mode refills as each group is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from rollmill.algos.filters import informative_groups, overlong_penalty
from rollmill.config import RunConfig
from rollmill.pipelines.common import BASELINE_INDEX
from rollmill.types import GroupSpec, Trajectory


@dataclass
class _Group:
    spec: GroupSpec
    version: int  # the rollout weights when it was launched
    trajs: list[Trajectory] = field(default_factory=list)
    arrived: int = 0
    baseline: Trajectory | None = None  # its baseline sample, once in

    @property
    def awaits_baseline(self) -> bool:
        return self.baseline is None and BASELINE_INDEX in self.spec.indices


@dataclass
class StepData:
    """What one update gets: the groups to train, and every group it saw (those, and the groups dropped
    since the last update), in group order."""

    groups: list[list[Trajectory]]
    sampled: list[list[Trajectory]]
    counts: dict[str, float]


class SampleQueue:
    """Groups in flight, groups ready to train, and the bookkeeping of what was dropped and why."""

    def __init__(self, cfg: RunConfig, drop_failed_groups: bool):
        self.cfg = cfg
        self.want = cfg.rollout.prompts_per_step
        self.size = cfg.rollout.group_size
        self.k = cfg.async_.max_staleness
        self.drop_failed = drop_failed_groups
        self.inflight: dict[int, _Group] = {}
        self.ready: dict[int, list[Trajectory]] = {}
        self.ready_specs: dict[int, GroupSpec] = {}  # what each ready group was launched from
        self.dropped: list[list[Trajectory]] = []  # completed since the last update, not trained
        self.spent = 0  # groups dropped this step that are not replaced (failures, refills used up)
        self.refills_left = self._refill_budget()
        self.counts: dict[str, float] = {}
        self.tail = cfg.tail_batching.enabled
        self.long: list[GroupSpec] = []  # prompts cut off by a short round, oldest first
        self.long_ids: set[int] = set()  # groups launched by a long round (never cut again), until they train or drop

    def _refill_budget(self) -> int:
        f = self.cfg.filters
        return f.max_refill_rounds * self.want if f.dynamic_sampling else 0

    # -- launching --------------------------------------------------------------------------------
    @property
    def extra_samples(self) -> int:
        """Samples launched per group beyond the G it keeps (redundant rollouts, or a short round's)."""
        if self.tail:
            return math.ceil(self.size * self.cfg.tail_batching.sample_factor) - self.size
        return self.cfg.async_.redundant_episodes

    @property
    def extra_groups(self) -> int:
        """Groups launched beyond those a step needs (`async.extra_groups`, or a short round's)."""
        if self.tail:
            return math.ceil(self.want * self.cfg.tail_batching.prompt_factor) - self.want
        return self.cfg.async_.extra_groups

    @property
    def samples_per_group(self) -> int:
        return self.size + self.extra_samples

    def capacity(self, rollout_version: int, next_update: int) -> int:
        """Groups that may start now on weights `rollout_version` when the next update to take data is
        the one from `next_update`: such a group can train in updates `next_update .. rollout_version + k`,
        so that many steps' worth (plus `async.extra_groups`), minus the groups in flight or waiting
        (they train first), minus this step's unreplaced drops."""
        steps = rollout_version + self.k - next_update + 1
        budget = steps * self.want + self.extra_groups
        return max(0, budget - len(self.inflight) - len(self.ready) - self.spent)

    def launched(self, specs: list[GroupSpec], version: int, long: bool = False) -> None:
        for spec in specs:
            self.inflight[spec.group_id] = _Group(spec, version)
        if long:
            self.long_ids |= {s.group_id for s in specs}

    @property
    def long_inflight(self) -> list[int]:
        """The long-round groups in flight."""
        return [gid for gid in self.inflight if gid in self.long_ids]

    # -- arrivals ---------------------------------------------------------------------------------
    def add(self, traj: Trajectory) -> int | None:
        """Take one finished sample; return its group id when that group just completed (its other
        samples still running can be cancelled)."""
        group = self.inflight.get(traj.group_id)
        if group is None or traj.attempt != group.spec.attempt:  # a straggler of a completed, dropped or cut-off run
            self.count("async/discarded_samples")
            return None
        group.arrived += 1
        if traj.index == BASELINE_INDEX:
            group.baseline = traj
        elif not (self.drop_failed and traj.failed) or self.extra_samples == 0:
            group.trajs.append(traj)
        if (len(group.trajs) < self.size or group.awaits_baseline) and group.arrived < len(group.spec.indices):
            return None
        del self.inflight[traj.group_id]
        self._complete(group)
        return traj.group_id

    def _complete(self, group: _Group) -> None:
        trajs = sorted(group.trajs, key=lambda t: t.index)[: self.size]
        if len(trajs) < self.size:  # redundant samples failed too: too few usable ones
            self.dropped.append(sorted(group.trajs, key=lambda t: t.index))
            self._drop("groups/dropped_for_failure")
            return
        self._shape(trajs + ([group.baseline] if group.baseline else []))
        if group.baseline is not None:
            for t in trajs:
                t.info["baseline_reward"] = group.baseline.reward
                t.info["baseline_failed"] = group.baseline.failed
            if group.baseline.failed:
                self.count("remax/failed_baselines")
        if self.drop_failed and any(t.failed for t in trajs):
            self.dropped.append(trajs)
            self._drop("groups/dropped_for_failure")
        elif self.cfg.filters.dynamic_sampling and not self._informative(trajs, group.baseline):
            self.dropped.append(trajs)
            self.count("filter/dropped_groups")
            if self.k == 0:
                return  # synchronous: the driver refills in rounds
            if self.refills_left > 0:
                self.refills_left -= 1
                self.count("filter/refilled_groups")
            else:
                self.spent += 1
        else:
            self.ready[group.spec.group_id] = trajs
            self.ready_specs[group.spec.group_id] = group.spec

    def _shape(self, trajs: list[Trajectory]) -> None:
        """DAPO's soft overlong punishment, added to each sample's reward (docs/algorithms.md §2.14)."""
        cache = self.cfg.filters.overlong_cache
        if not cache:
            return
        lengths = torch.tensor([t.sampled_tokens for t in trajs])
        for t, s in zip(trajs, overlong_penalty(lengths, self.cfg.rollout.sampling.max_new_tokens, cache)):
            t.turns[-1].reward = t.turns[-1].reward + float(s)
            t.info["overlong_penalty"] = float(s)

    def _drop(self, key: str) -> None:
        self.count(key)
        self.spent += 1

    def count(self, key: str, n: float = 1.0) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + n

    def _informative(self, trajs: list[Trajectory], baseline: Trajectory | None) -> bool:
        """Whether a group has a nonzero advantage to train on: its rewards spread, or one of them differs
        from the greedy reward ReMax measures them from (a failed greedy sample is no baseline: §C.3)."""
        scored = trajs + ([baseline] if baseline is not None and not baseline.failed else [])
        return bool(informative_groups(self._scores([scored]))[0])

    @staticmethod
    def _scores(groups: list[list[Trajectory]]) -> torch.Tensor:
        return torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32)

    # -- synchronous rounds -----------------------------------------------------------------------
    def refill(self) -> int:
        """Synchronous dynamic sampling: after a wave, how many groups the next refill round samples."""
        return self.want - len(self.ready)

    # -- handing out a batch ----------------------------------------------------------------------
    def take(self, version: int, force: bool = False, ids: list[int] | None = None) -> StepData | None:
        """The groups for the update from `version` (oldest first), or None while more must arrive
        (`force`: whatever is ready, the synchronous driver's call after its last refill round; `ids`:
        exactly these ready groups, the ones a streamed update already trained on).

        Groups whose oldest token is more than k versions behind are dropped here (and replaced)."""
        for gid in [g for g, trajs in self.ready.items() if _oldest(trajs, version) < version - self.k]:
            self._expire(gid)
        if not force and any(self.inflight[g].version + self.k <= version for g in self.long_inflight):
            return None  # a long-round group can train in no later update: this one waits for it
        full = len(self.ready) >= self.want
        if not (full or force) and (self.inflight or self.capacity(version, version) > 0):
            return None
        # earliest deadline first: the group whose tokens are oldest can wait the least
        if ids is None:
            ids = sorted(self.ready, key=lambda g: (_oldest(self.ready[g], version), g))[: self.want]
        groups = [self.ready.pop(g) for g in ids]
        for g in ids:
            self.ready_specs.pop(g, None)
        if self.k == 0:  # synchronous: a surplus group can train in no later update
            for gid in list(self.ready):
                self._expire(gid)
        seen = sorted(groups + self.dropped, key=lambda g: g[0].group_id)
        if self.tail:
            self.counts["tail/long_groups"] = float(len(self.long_ids & set(ids)))
            self.long_ids -= {g[0].group_id for g in seen}
        data = StepData(groups, seen, self.counts)
        self.dropped, self.counts, self.spent = [], {}, 0
        self.refills_left = self._refill_budget()
        return data

    def _expire(self, gid: int) -> None:
        """A ready group too old for any later update: with tail batching its prompt waits for a long
        round (sampled again), otherwise it is dropped as stale."""
        spec, trajs = self.ready_specs.pop(gid, None), self.ready.pop(gid)
        if self.tail and spec is not None:
            self.long.append(self._again(spec))
            self.count("tail/deferred_prompts")
        else:
            self.dropped.append(trajs)
            self.count("async/stale_groups")

    def abandon(self) -> list[int]:
        """Stop the groups still in flight (a synchronous step that already has its groups); return their
        ids. With tail batching they wait in the long-prompt queue (`defer`); otherwise they are forgotten."""
        ids = list(self.inflight)
        if self.tail:
            self.defer(ids)
        else:
            self.count("async/abandoned_groups", len(ids))
            self.inflight.clear()
        return ids

    def defer(self, ids: list[int]) -> None:
        """Move these groups in flight to the long-prompt queue, to be sampled again from scratch with G
        samples as a new attempt (late samples of the stopped run then do not count)."""
        self.long.extend(self._again(self.inflight.pop(gid).spec) for gid in ids)
        self.count("tail/deferred_prompts", len(ids))

    def _again(self, spec: GroupSpec) -> GroupSpec:
        baseline = tuple(i for i in spec.indices if i == BASELINE_INDEX)
        return replace(spec, indices=tuple(range(self.size)) + baseline, attempt=spec.attempt + 1)

    def overdue(self, next_update: int) -> list[int]:
        """Asynchronous tail batching: short-round groups in flight that can no longer train in update
        `next_update` or later (their launch weights would be more than k behind): the driver defers
        them instead of letting them run on to be dropped as stale."""
        return [gid for gid, g in self.inflight.items() if gid not in self.long_ids and g.version < next_update - self.k]

    def long_round(self) -> list[GroupSpec]:
        """The groups of a long round, oldest first, once the long-prompt queue holds a step's worth."""
        if len(self.long) < self.want:
            return []
        specs, self.long = self.long[: self.want], self.long[self.want :]
        return specs

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps: ready groups as they are; groups in flight as specs to start again."""
        return {"ready": self.ready, "ready_specs": self.ready_specs, "restart": [g.spec for g in self.inflight.values()],
                "long": self.long}

    def load_state(self, state: dict) -> list[GroupSpec]:
        """Restore ready groups and the long-prompt queue; return the specs to launch again."""
        self.ready = dict(state["ready"])
        self.ready_specs = dict(state.get("ready_specs", {}))
        self.long = list(state.get("long", []))
        return list(state["restart"])


def _oldest(trajs: list[Trajectory], version: int) -> int:
    """The weights version of the group's oldest sampled token (`version` when it sampled none)."""
    return min((t.oldest_version for t in trajs if t.oldest_version is not None), default=version)
