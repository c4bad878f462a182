"""Agentic RL: multi-turn episodes against an env -> per-turn credit -> the same policy update.

A group is `group_size` episodes of one env seed. `EnvSeedSource` runs on the driver, `EnvEpisodes`
(the agent loop over a pool of envs) on the rollout worker, `update` (per-turn credit from
`train.agent_credit`) on the learner.
"""

from __future__ import annotations

import asyncio
import random

import torch

from rollmill.agent import Agent
from rollmill.config import RunConfig
from rollmill.envs import make_env
from rollmill.pipelines.base import EpisodeContext, RLPipeline
from rollmill.pipelines.common import EVAL_SEED_BASE, env_seed, sample_seed, sampling_params, step_seed
from rollmill.train import build_batch
from rollmill.train.agent_credit import token_advantages, turn_advantages
from rollmill.train.anchor_credit import anchor_scaled_advantages
from rollmill.types import GroupSpec, Trajectory

END_REASONS = ("terminated", "max_turns", "context", "env_truncated", "env_error", "env_timeout")


class EnvSeedSource:
    """Env seeds for training groups (a function of the group id) and the held-out seeds."""

    def __init__(self, cfg: RunConfig):
        self.seed = cfg.train.seed
        self.eval_episodes = cfg.env.eval_episodes
        self.groups_started = 0

    def next_groups(self, count: int, samples: int) -> list[GroupSpec]:
        specs = []
        for gid in range(self.groups_started, self.groups_started + count):
            seed = env_seed(self.seed, gid, EVAL_SEED_BASE)
            specs.append(GroupSpec(gid, seed, seed, tuple(range(samples))))
        self.groups_started += count
        return specs

    def eval_groups(self, samples: int) -> list[GroupSpec]:
        """One episode per held-out seed (never trained on: training seeds stay below EVAL_SEED_BASE)."""
        return [GroupSpec(i, EVAL_SEED_BASE + i, EVAL_SEED_BASE + i, (0,), eval=True) for i in range(self.eval_episodes)]

    def state(self) -> dict:
        return {"groups_started": self.groups_started}

    def load_state(self, state: dict) -> None:
        self.groups_started = state["groups_started"]


class EnvEpisodes:
    """Episodes on envs from a pool (an env is reused once its episode ended cleanly)."""

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg = cfg
        timeout = cfg.env.step_timeout_s
        self.agent = Agent(tokenizer, cfg.agent, sampling_params(cfg.rollout.sampling, n=1), timeout)
        self.eval_agent = Agent(tokenizer, cfg.agent, sampling_params(cfg.rollout.sampling, n=1, temperature=cfg.eval.temperature,
                                                                      max_new_tokens=cfg.eval.max_new_tokens), timeout)
        self.eval_seed = step_seed(cfg.train.seed, -1)
        self._free: list = []
        self.resample = cfg.agent.ipa_resample
        self._prefixes = _Prefixes()

    async def run(self, spec: GroupSpec, index: int, ctx: EpisodeContext) -> Trajectory:
        agent, base = (self.eval_agent, self.eval_seed) if spec.eval else (self.agent, self.cfg.train.seed)
        seed = sample_seed(base, spec.group_id, index)
        prefix, boundary = await self._resample_point(spec, index, seed, ctx)
        env = self._free.pop() if self._free else make_env(self.cfg.env.name, **self.cfg.env.kwargs)
        traj = Trajectory(spec.group_id, index, spec.prompt_id, info={"env": self.cfg.env.name})
        clean = False
        try:
            if hasattr(env, "run_episode"):  # an env that plays whole episodes itself (the harness env)
                traj = await env.run_episode(traj, spec.payload, seed, ctx.generate, tokenizer=agent.tokenizer,
                                             sampling=agent.sampling, max_context_tokens=agent.cfg.max_context_tokens)
            else:
                traj = await agent.run_episode(env, traj, spec.payload, seed, ctx.generate, prefix, boundary)
            if boundary:
                traj.info["resampled_from"] = {"episode": prefix.index, "boundary": boundary}
            clean = traj.end_reason != "env_timeout"  # a hung call may still be using the env
        finally:
            if clean:
                self._free.append(env)
            if self._is_prefix(spec, index):
                self._prefixes.publish((spec.group_id, spec.attempt), traj if clean else None)
        return traj

    def _readers(self, spec: GroupSpec) -> int:
        """How many episodes of this launch restart from its episode 0: those of the group's last
        `agent.ipa_resample` it holds (a launch may hold part of a group: `async.prompt_replication`)."""
        if not self.resample or spec.eval:
            return 0
        group = self.cfg.rollout.group_size
        return sum(group - self.resample <= i < group for i in spec.indices)

    def _is_prefix(self, spec: GroupSpec, index: int) -> bool:
        """Whether this episode is published for resampling: episode 0, when its launch holds a reader (an
        entry without readers would never be dropped)."""
        return index == 0 and self._readers(spec) > 0

    async def _resample_point(self, spec: GroupSpec, index: int, seed: int,
                              ctx: EpisodeContext) -> tuple[Trajectory | None, int]:
        """For one of the group's last `agent.ipa_resample` episodes: episode 0 of the group, once it
        ended, and a chunk boundary k drawn uniformly from 1..K-1 of its K turns (seeded by this episode's
        sample seed). (None, 0), a start from the env's initial state, for every other episode, and when
        episode 0 is not part of this launch, failed, or has fewer than two turns."""
        group = self.cfg.rollout.group_size
        if not (self.resample and not spec.eval and group - self.resample <= index < group and 0 in spec.indices):
            return None, 0
        prefix = await self._prefixes.get((spec.group_id, spec.attempt), ctx, readers=self._readers(spec))
        if prefix is None or prefix.failed or prefix.num_turns < 2:
            return None, 0
        return prefix, random.Random(seed).randint(1, prefix.num_turns - 1)

    def close(self) -> None:
        for env in self._free:
            getattr(env, "close", lambda: None)()
        self._free.clear()


class _Prefixes:
    """Episode 0 of each training group, handed to the group's resampled episodes once it ended."""

    def __init__(self):
        self._waiting: dict[tuple, list] = {}  # (group id, attempt) -> [future, readers still to come]

    def _entry(self, key: tuple, readers: int) -> list:
        if key not in self._waiting:
            self._waiting[key] = [asyncio.get_running_loop().create_future(), readers]
        return self._waiting[key]

    def publish(self, key: tuple, traj: Trajectory | None) -> None:
        future = self._entry(key, readers=0)[0]
        if not future.done():
            future.set_result(traj)

    async def get(self, key: tuple, ctx: EpisodeContext, readers: int) -> Trajectory | None:
        """The episode published under `key`; the entry is dropped once all its `readers` have it."""
        entry = self._entry(key, readers)
        entry[1] = max(entry[1], readers)
        try:
            return await ctx.wait(asyncio.shield(entry[0]))
        finally:
            entry[1] -= 1
            if entry[1] <= 0:
                self._waiting.pop(key, None)


class AgenticPipeline(RLPipeline):
    name = "agentic"
    headline = "eval/success"
    drop_failed_groups = True
    samples_key, failed_key = "rollout/episodes", "episode/failed"
    all_failed_message = "every episode failed for {steps} steps in a row (last error: {error}); see the log"

    def source(self, cfg: RunConfig) -> EnvSeedSource:
        return EnvSeedSource(cfg)

    def episodes(self, cfg: RunConfig, tokenizer) -> EnvEpisodes:
        return EnvEpisodes(cfg, tokenizer)

    def trainer_options(self, cfg: RunConfig) -> dict:
        """One chunk per turn under IPA; length normalisation (Dr.GRPO) spans the whole episode row."""
        ipa = cfg.agent.credit == "ipa"
        return {"max_new_tokens": None, "segment_ratio": ipa,
                "segment_mismatch_bound": cfg.agent.ipa_mismatch_bound if ipa else None}

    def update(self, learner, groups: list[list[Trajectory]]) -> dict[str, float]:
        cfg = learner.cfg
        trajs = [t for g in groups for t in g]
        per_turn = turn_advantages(trajs, cfg.agent, learner.advantages, cfg.rollout.group_size)
        rows, advs = [], []
        for traj, adv in zip(trajs, per_turn):
            rows.extend(traj.rows)
            advs.extend(token_advantages(traj, adv))
        batch = build_batch(rows, advs, learner.pad_id)
        if cfg.algorithm.anchor_credit != "none":
            # Env text is off the mask, so only the policy's own tokens compete for the gate.
            batch.advantages = anchor_scaled_advantages(learner.model, batch, cfg.algorithm,
                                                        cfg.train.micro_batch_size)
        metrics = learner.trainer.step(batch)
        learner.after_update(metrics, None, batch)
        metrics["train/rows"] = float(batch.size)
        return metrics

    def rollout_metrics(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        trajs = [t for g in groups for t in g]
        metrics = episode_metrics(trajs)
        metrics["groups/dropped_for_failure"] = float(sum(any(t.failed for t in g) for g in groups))
        return metrics

    def sample_dump(self, traj: Trajectory, tokenizer) -> dict:
        """A readable episode: each turn's reply, action, reward and observation, and each row's text with
        the trained tokens wrapped in [[ ]] (everything outside them had loss mask 0)."""
        return {
            "seed": traj.prompt_id, "group": traj.group_id, "reward": traj.reward, "success": traj.success,
            "end_reason": traj.end_reason, "error": traj.error, "initial_observation": traj.initial_observation,
            **({"resampled_from": traj.info["resampled_from"]} if "resampled_from" in traj.info else {}),
            "turns": [{"reply": t.reply, "action": t.action, "reward": t.reward, "invalid": t.invalid,
                       "observation": t.observation} for t in traj.turns],
            "trained_view": [_marked_text(row, tokenizer) for row in traj.rows],
        }

    def eval_metrics(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        """eval/success, eval/reward, eval/turns, eval/invalid_rate, eval/failed (and which limits ended episodes)."""
        trajs = [t for g in groups for t in g]
        return {f"eval/{k.split('/')[-1]}": v for k, v in episode_metrics(trajs).items()
                if k in ("episode/success", "episode/reward", "episode/turns", "episode/invalid_rate", "episode/failed")
                or k.startswith("end/limit_")}


def episode_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Success, reward, length, invalid actions and failures over a batch of episodes."""
    n = len(trajs)
    turns = sum(t.num_turns for t in trajs)
    rewards = torch.tensor([t.reward for t in trajs])
    metrics = {
        "rollout/episodes": float(n),
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if n > 1 else 0.0,
        "episode/success": sum(t.success for t in trajs) / n,
        "episode/reward": float(rewards.mean()),
        "episode/turns": turns / n,
        "episode/invalid_rate": sum(t.invalid_actions for t in trajs) / max(turns, 1),
        "episode/failed": float(sum(t.failed for t in trajs)),
        "episode/reply_tokens": sum(t.sampled_tokens for t in trajs) / n,
    }
    resampled = sum("resampled_from" in t.info for t in trajs)
    if resampled:  # only runs with agent.ipa_resample have the key
        metrics["episode/resampled"] = resampled / n
    for reason in END_REASONS:
        metrics[f"end/{reason}"] = sum(t.end_reason == reason for t in trajs) / n
    for limit in sorted({t.info["limit"] for t in trajs if "limit" in t.info}):
        metrics[f"end/limit_{limit}"] = sum(t.info.get("limit") == limit for t in trajs) / n
    return metrics


def _marked_text(row, tokenizer) -> str:
    parts, start = [], 0
    ids, mask = row.token_ids, row.mask
    while start < len(ids):
        end = start
        while end < len(ids) and mask[end] == mask[start]:
            end += 1
        text = tokenizer.decode(ids[start:end])
        parts.append(f"[[{text}]]" if mask[start] else text)
        start = end
    return "".join(parts)
