"""What an RL pipeline says, role by role; the runtime (`rollmill.runtime`) runs it.

A pipeline is a set of small pieces, each used by one role and each built from the config alone, so
that the same pipeline runs in one process or with its roles as Ray actors:
- driver: a `Source` of groups to sample (prompts or env seeds, with their ids), the step's rollout
  metrics, readable sample dumps, held-out metrics;
- rollout worker: `Episodes`, which turn one `GroupSpec` sample into a `Trajectory` by awaiting
  replies from the engine (and scores from the reward workers, or steps from an env);
- learner: `update`, which turns groups of trajectories into advantages and one policy update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from rollmill.config import RunConfig
from rollmill.rewards import Score
from rollmill.rollout.engine import Completion, Request
from rollmill.types import GroupSpec, Trajectory

log = logging.getLogger(__name__)


@dataclass
class EpisodeContext:
    """What the rollout worker lends one sample: replies from its engine, scores from the reward workers,
    and `wait`, for awaiting anything else that may take long (another sample of the group)."""

    generate: Callable[[Request], Awaitable[Completion]]
    score: Callable[[str, Any], Awaitable[Score]]
    step_out: Callable[[], None] = lambda: None  # leave the lockstep wave while not generating
    step_in: Callable[[], None] = lambda: None  # join it again

    async def wait(self, awaitable: Awaitable) -> Any:
        """Await `awaitable` outside the lockstep wave, so peers that generate in lockstep do not wait
        for this sample meanwhile (they would wait forever for one that waits on them)."""
        self.step_out()
        try:
            return await awaitable
        finally:
            self.step_in()


class Source(Protocol):
    """The driver's stream of groups to sample; its state is saved in checkpoints."""

    def next_groups(self, count: int, samples: int) -> list[GroupSpec]: ...

    def eval_groups(self, samples: int) -> list[GroupSpec]: ...

    def state(self) -> dict: ...

    def load_state(self, state: dict) -> None: ...


class Episodes(Protocol):
    """The rollout worker's side: play sample `index` of `spec`."""

    async def run(self, spec: GroupSpec, index: int, ctx: EpisodeContext) -> Trajectory: ...

    def close(self) -> None: ...


class RLPipeline:
    """Base of the RL pipelines: the pieces every role asks for by `cfg.pipeline`."""

    name = ""
    headline = "eval/accuracy"  # the held-out metric shown in logs and the progress bar
    drop_failed_groups = False  # a group with a failed sample does not train (agentic: a broken env)
    needs_reference = False  # the learner keeps a frozen copy of the initial policy whatever the KL settings
    samples_key, failed_key = "rollout/samples", "reward/failed"  # for the "everything fails" health check
    all_failed_message = ("the reward failed on every sample for {steps} steps in a row (last error: {error}); "
                          "see the log and fix reward.functions")

    def source(self, cfg: RunConfig) -> Source:
        raise NotImplementedError

    def episodes(self, cfg: RunConfig, tokenizer) -> Episodes:
        raise NotImplementedError

    def trainer_options(self, cfg: RunConfig) -> dict:
        """Keyword arguments for `PolicyTrainer` (length normalisation, chunk-level ratios)."""
        return {"max_new_tokens": cfg.rollout.sampling.max_new_tokens}

    def update(self, learner, groups: list[list[Trajectory]]) -> dict[str, float]:
        """Advantages for `groups` (group-major, G samples each) and one update of `learner`'s policy."""
        raise NotImplementedError

    def rollout_metrics(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        raise NotImplementedError

    def sample_dump(self, traj: Trajectory, tokenizer) -> dict:
        raise NotImplementedError

    def eval_metrics(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        raise NotImplementedError

    def log_failures(self, step: int, trajs: list[Trajectory], where: str = "") -> None:
        """One line per failed sample (three at most): what broke."""
        for t in [t for t in trajs if t.failed][:3]:
            log.warning("step %d: %s(group %d, sample %d) failed: %s", step, where, t.group_id, t.index, t.error)
