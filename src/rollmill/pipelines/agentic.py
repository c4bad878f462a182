"""Agentic RL: batches of multi-turn episodes against an env -> per-turn credit -> the same policy update.

Shares the engine, trainer, losses, checkpoints and logging with RLVR (`BasePipeline`); what differs
is the data (env seeds instead of prompts), the rollout (`AgentLoop`) and the credit
(`train.agent_credit`). A group is `group_size` episodes of one env seed.
"""

from __future__ import annotations

import logging
import time

import torch

from rollmill.agent import AgentLoop, Trajectory
from rollmill.envs import make_env
from rollmill.pipelines.base import BasePipeline
from rollmill.pipelines.common import env_seed, sample_seed, sampling_params, spread, step_seed
from rollmill.train.agent_credit import token_advantages, turn_advantages
from rollmill.train.batch import build_row_batch

log = logging.getLogger(__name__)

EVAL_SEED_BASE = 1_000_000_000  # training seeds stay below this, so held-out episodes are never trained on


class AgenticPipeline(BasePipeline):
    headline = "eval/success"

    def __init__(self, cfg, run_dir, resume: bool = False):
        ipa = cfg.agent.credit == "ipa"
        # one chunk per turn under IPA; length normalisation (Dr.GRPO) spans the whole episode row
        super().__init__(cfg, run_dir, resume, max_new_tokens=None, segment_ratio=ipa,
                         segment_mismatch_bound=cfg.agent.ipa_mismatch_bound if ipa else None)
        self.loop = AgentLoop(self.engine, self.tokenizer, cfg.agent, sampling_params(cfg.rollout.sampling, n=1),
                              step_timeout_s=cfg.env.step_timeout_s)

    def _load_data(self) -> None:
        cfg = self.cfg
        count = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        self.envs = [make_env(cfg.env.name, **cfg.env.kwargs) for _ in range(count)]
        self.eval_envs = [make_env(cfg.env.name, **cfg.env.kwargs) for _ in range(cfg.env.eval_episodes)]
        self._all_failed_streak = 0
        self.groups_started = 0

    def _data_state(self) -> dict:
        return {"groups_started": self.groups_started}

    def _restore_data(self, state: dict) -> None:
        self.groups_started = state["groups_started"]

    def _held_out(self) -> dict:
        return evaluate_episodes(self.engine, self.tokenizer, self.cfg, self.eval_envs)

    def rollout_and_train(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        g = cfg.rollout.group_size
        first = self.groups_started
        groups = [first + i // g for i in range(cfg.rollout.prompts_per_step * g)]
        seeds = [env_seed(cfg.train.seed, gid, EVAL_SEED_BASE) for gid in groups]
        sample_seeds = [sample_seed(cfg.train.seed, gid, i % g) for i, gid in enumerate(groups)]
        trajs = self.loop.play(self.envs, seeds, groups, sample_seeds, env_name=cfg.env.name)
        self.groups_started += cfg.rollout.prompts_per_step
        t_rollout = time.perf_counter() - t0
        failed_groups = {t.group_id for t in trajs if t.failed}
        kept = [t for t in trajs if t.group_id not in failed_groups]
        train_metrics = self._update(kept) if kept else {}
        if not kept:
            log.warning("step %d: every group had a failed episode; no update this step", self.step + 1)
        t_train = time.perf_counter() - t0 - t_rollout
        self.step += 1
        t_sync = self._sync_weights()
        for t in [t for t in trajs if t.failed][:3]:
            log.warning("step %d: episode (seed %d) failed: %s", self.step, t.seed, t.error)
        tokens = sum(len(r.token_ids) for t in trajs for r in t.rows)
        record = {"step": self.step, **episode_metrics(trajs), "groups/dropped_for_failure": float(len(failed_groups)),
                  **train_metrics, "time/rollout_s": t_rollout, "time/train_s": t_train, "time/sync_s": t_sync,
                  "throughput/tokens_per_s": tokens / (t_rollout + t_train)}
        self.logger.log_samples(self.step, [episode_dump(trajs[i], self.tokenizer) for i in spread(len(trajs), cfg.log.samples_per_step)])
        return record

    def _update(self, trajs: list[Trajectory]) -> dict[str, float]:
        per_turn = turn_advantages(trajs, self.cfg.agent, self.advantages, self.cfg.rollout.group_size)
        rows, advs = [], []
        for traj, adv in zip(trajs, per_turn):
            rows.extend(traj.rows)
            advs.extend(token_advantages(traj, adv))
        batch = build_row_batch(rows, advs, self.tokenizer.pad_token_id)
        metrics = self.trainer.step(batch)
        self._check_consistency(metrics)
        self._apply_kl_control(metrics, None, batch.mask, batch.size)
        metrics["train/rows"] = float(batch.size)
        return metrics

    def _check_health(self, record: dict) -> None:
        """Stop when every episode fails for several steps: the env is broken, not unlucky."""
        all_failed = record["episode/failed"] == record["rollout/episodes"]
        self._all_failed_streak = self._all_failed_streak + 1 if all_failed else 0
        if self._all_failed_streak >= self.cfg.reward.max_all_failed_steps:
            raise RuntimeError(f"every episode failed for {self._all_failed_streak} steps in a row; see the log")


def evaluate_episodes(engine, tokenizer, cfg, envs=None, temperature: float | None = None) -> dict[str, float]:
    """Held-out episodes (one per eval seed, never trained on) at the eval temperature (0 = greedy):
    eval/success, eval/reward, eval/turns, eval/invalid_rate, eval/failed."""
    envs = envs or [make_env(cfg.env.name, **cfg.env.kwargs) for _ in range(cfg.env.eval_episodes)]
    temperature = cfg.eval.temperature if temperature is None else temperature
    sampling = sampling_params(cfg.rollout.sampling, n=1, temperature=temperature, max_new_tokens=cfg.eval.max_new_tokens)
    loop = AgentLoop(engine, tokenizer, cfg.agent, sampling, step_timeout_s=cfg.env.step_timeout_s)
    seeds = [EVAL_SEED_BASE + i for i in range(len(envs))]
    eval_seed = step_seed(cfg.train.seed, -1)
    trajs = loop.play(envs, seeds, list(range(len(seeds))), [sample_seed(eval_seed, i, 0) for i in range(len(seeds))],
                      env_name=cfg.env.name)
    for t in [t for t in trajs if t.failed][:3]:
        log.warning("held-out episode (seed %d) failed: %s", t.seed, t.error)
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
        "episode/reply_tokens": sum(sum(r.mask) for t in trajs for r in t.rows) / n,
    }
    for reason in ("terminated", "max_turns", "context", "env_truncated", "env_error", "env_timeout"):
        metrics[f"end/{reason}"] = sum(t.end_reason == reason for t in trajs) / n
    for limit in sorted({t.info["limit"] for t in trajs if "limit" in t.info}):
        metrics[f"end/limit_{limit}"] = sum(t.info.get("limit") == limit for t in trajs) / n
    return metrics


def episode_dump(traj: Trajectory, tokenizer) -> dict:
    """A readable episode: each turn's reply, action, reward and observation, and each row's text with
    the trained tokens wrapped in [[ ]] (everything outside them had loss mask 0)."""
    return {
        "seed": traj.seed, "group": traj.group_id, "reward": traj.reward, "success": traj.success,
        "end_reason": traj.end_reason, "error": traj.error, "initial_observation": traj.initial_observation,
        "turns": [{"reply": t.reply, "action": t.action, "reward": t.reward, "invalid": t.invalid,
                   "observation": t.observation} for t in traj.turns],
        "trained_view": [_marked_text(row, tokenizer) for row in traj.rows],
    }


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
