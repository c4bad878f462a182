"""RLVR: prompts -> G samples each -> verifiable rewards -> advantages -> policy update, repeated.

This file composes the parts (tasks, engine, rewards, algos, trainer, checkpoints, logging); it
holds no math of its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from rollmill.config import RunConfig
from rollmill.pipelines.base import BasePipeline, TrainResult
from rollmill.pipelines.common import PromptCursor, spread, step_seed
from rollmill.pipelines.evaluate import evaluate
from rollmill.pipelines.groups import Groups, collect_groups
from rollmill.tasks import load_task
from rollmill.train import build_batch
from rollmill.train.anchor_credit import anchor_scaled_advantages

log = logging.getLogger(__name__)


def _rollout_metrics(groups: Groups) -> dict[str, float]:
    """What the policy did this step, over every sampled group (filtered ones included)."""
    scores, comps = groups.scores, groups.completions
    lengths = [len(c.token_ids) for c in comps]
    return {
        "rollout/samples": len(comps),
        "reward/mean": float(scores.mean()),
        "reward/std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "reward/failed": float(sum(groups.failed)),
        "accuracy/train": sum(groups.correct) / len(comps),
        "groups/zero_std_fraction": float((scores.std(dim=1) == 0).float().mean()) if scores.shape[1] > 1 else 1.0,
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/clipped_fraction": sum(c.finish_reason == "length" for c in comps) / len(comps),
    }


def _sample_dump(groups: Groups, count: int) -> list[dict]:
    """Readable samples spread over the groups: prompt, answer, completion, reward."""
    g = groups.group_size
    return [
        {"prompt": groups.examples[i // g].prompt, "answer": groups.examples[i // g].answer,
         "completion": groups.completions[i].text, "reward": groups.rewards[i], "correct": groups.correct[i],
         "finish_reason": groups.completions[i].finish_reason}
        for i in spread(len(groups.completions), count)
    ]


class RLVRPipeline(BasePipeline):
    """Prompts from a task, G samples each, verifiable rewards."""

    def _load_data(self) -> None:
        cfg = self.cfg
        self.train_examples, self.eval_examples = load_task(cfg.task)
        self.cursor = PromptCursor(self.train_examples, seed=cfg.task.seed + cfg.train.seed)
        self.groups_started = 0
        self._all_failed_streak = 0
        self._last_reward_error = ""

    def _data_state(self) -> dict:
        return {"cursor": self.cursor.state(), "groups_started": self.groups_started}

    def _restore_data(self, state: dict) -> None:
        self.cursor = PromptCursor(self.train_examples, self.cursor.seed, **state["cursor"])
        self.groups_started = state["groups_started"]

    def _held_out(self) -> dict:
        """Eval metrics on the held-out split; the same sampling seed every time, so evals compare."""
        return evaluate(self.engine, self.tokenizer, self.eval_examples, self.cfg, seed=step_seed(self.cfg.train.seed, -1))

    def rollout_and_train(self) -> dict:
        """One RL step: sample and score groups, filter, compute advantages, update, sync weights."""
        cfg = self.cfg
        t0 = time.perf_counter()
        sampled, kept, rounds = collect_groups(self.engine, self.tokenizer, self.cursor, cfg, self.groups_started)
        self.groups_started += len(sampled.examples)
        t_rollout = time.perf_counter() - t0
        train_metrics: dict[str, float] = {}
        if kept.examples:
            train_metrics = self._update(kept)
        else:
            log.warning("step %d: no informative group after %d refills; no update this step", self.step + 1, rounds)
        t_train = time.perf_counter() - t0 - t_rollout
        self.step += 1
        t_sync = self._sync_weights()
        for line in sampled.errors[:3]:
            log.warning("step %d: reward failed: %s", self.step, line)
        if sampled.errors:
            self._last_reward_error = sampled.errors[0]
        record = {"step": self.step, **_rollout_metrics(sampled), **train_metrics}
        if cfg.filters.dynamic_sampling:
            record.update({"filter/kept_groups": len(kept.examples), "filter/sampled_groups": len(sampled.examples),
                           "filter/refill_rounds": rounds})
        tokens = sum(len(c.token_ids) for c in sampled.completions)
        record.update({"time/rollout_s": t_rollout, "time/train_s": t_train, "time/sync_s": t_sync,
                       "throughput/tokens_per_s": tokens / (t_rollout + t_train),
                       "throughput/rollout_tokens_per_s": tokens / t_rollout})
        self.logger.log_samples(self.step, _sample_dump(sampled, cfg.log.samples_per_step))
        return record

    def _update(self, kept: Groups) -> dict[str, float]:
        """Advantages (scalar estimator, or GAE over the critic's values), KL shaping, the update."""
        algo = self.cfg.algorithm
        scores = kept.scores
        batch = build_batch(kept.completions, torch.zeros(len(kept.completions)), self.tokenizer.pad_token_id)
        batch.mask *= kept.loss_weights(self.cfg)[:, None]
        ref_logp = token_kl = None
        if algo.kl_placement == "reward" and algo.kl_coef > 0:
            ref_logp = self.trainer.reference_logprobs(batch)
            token_kl = self.kl.token_kl(batch, ref_logp)
        if self.critic is None:
            if token_kl is not None:
                scores = self.kl.penalized_scores(scores, token_kl)
            batch.advantages = self.advantages(scores, batch.mask)
            if algo.credit != "none":
                batch.advantages = anchor_scaled_advantages(self.model, batch, algo, self.cfg.train.micro_batch_size)
            metrics = self.trainer.step(batch, ref_logp=ref_logp)
        else:
            beta = self.kl.beta if token_kl is not None else 0.0
            batch.advantages, returns, old_values = self.critic.advantages(batch, scores.flatten(), token_kl, beta)
            metrics = {**self.trainer.step(batch, ref_logp=ref_logp), **self.critic.step(batch, old_values, returns)}
        self._check_consistency(metrics)
        self._apply_kl_control(metrics, token_kl, batch.mask, batch.size)
        return metrics

    def _check_health(self, record: dict) -> None:
        """Stop when the reward fails on every sample for several steps: that is a bug, not bad luck."""
        all_failed = record["reward/failed"] == record["rollout/samples"]
        self._all_failed_streak = self._all_failed_streak + 1 if all_failed else 0
        if self._all_failed_streak >= self.cfg.reward.max_all_failed_steps:
            raise RuntimeError(
                f"the reward failed on every sample for {self._all_failed_streak} steps in a row "
                f"(last error: {self._last_reward_error}); see the log and fix reward.functions"
            )


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> TrainResult:
    """Train per `cfg` into `run_dir` (continuing from its latest checkpoint with `resume`); the
    config's `pipeline` picks RLVR or the agentic pipeline."""
    if cfg.pipeline == "agentic":
        from rollmill.pipelines.agentic import AgenticPipeline

        return AgenticPipeline(cfg, run_dir, resume=resume).run()
    return RLVRPipeline(cfg, run_dir, resume=resume).run()
