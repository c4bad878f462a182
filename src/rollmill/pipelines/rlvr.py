"""RLVR: prompts -> G samples each -> verifiable rewards -> advantages -> policy update, repeated.

This file composes the parts (tasks, engine, rewards, algos, trainer, checkpoints, logging); it
holds no math of its own.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rollmill.algos import CRITIC_ADVANTAGES
from rollmill.config import RunConfig, dump_config
from rollmill.models import load_model
from rollmill.pipelines.common import PromptCursor, seed_everything, step_seed
from rollmill.pipelines.evaluate import evaluate
from rollmill.pipelines.groups import Groups, collect_groups
from rollmill.rollout import HFEngine
from rollmill.tasks import load_task
from rollmill.track import RunLogger, plot_run
from rollmill.train import PolicyTrainer, build_batch, list_checkpoints, load_checkpoint, save_checkpoint
from rollmill.train.advantages import AdvantageComputer
from rollmill.train.anchor_credit import anchor_scaled_advantages
from rollmill.train.critic import CriticTrainer
from rollmill.train.kl_control import KLControl

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
        for i in _spread(len(groups.completions), count)
    ]


def _spread(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `total`, so dumped samples cover several groups."""
    count = min(count, total)
    return [i * total // count for i in range(count)] if count else []


@dataclass
class TrainResult:
    run_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    steps: int


class RLVRPipeline:
    """Owns one run: its model, engine, trainer, data cursor and run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.train_examples, self.eval_examples = load_task(cfg.task)  # bad data fails before the model loads
        self.model, self.tokenizer = load_model(cfg.model)
        ref = None
        if cfg.algorithm.kl_coef > 0 or cfg.algorithm.track_kl:
            ref = copy.deepcopy(self.model).requires_grad_(False)
        self.engine = HFEngine(self.model, self.tokenizer, batch_size=cfg.rollout.batch_size)
        self.trainer = PolicyTrainer(
            self.model, cfg.train, cfg.algorithm, temperature=cfg.rollout.sampling.temperature,
            max_new_tokens=cfg.rollout.sampling.max_new_tokens, ref_model=ref,
        )
        self.kl = KLControl(cfg.algorithm)
        self.advantages = AdvantageComputer(cfg.algorithm)
        needs_critic = cfg.algorithm.advantage in CRITIC_ADVANTAGES
        self.critic = CriticTrainer(self.model, cfg.train, cfg.algorithm) if needs_critic else None
        self.cursor = PromptCursor(self.train_examples, seed=cfg.task.seed + cfg.train.seed)
        self.step = 0
        self.eval_before: dict | None = None
        self._all_failed_streak = 0
        self._last_reward_error = ""
        run_dir.mkdir(parents=True, exist_ok=True)
        resume_step = self._resume() if resume else None
        dump_config(cfg, run_dir / "config.yaml")
        self.logger = RunLogger(run_dir, tensorboard=cfg.log.tensorboard, resume_step=resume_step)

    def _resume(self) -> int:
        ckpts = list_checkpoints(self.run_dir / "checkpoints")
        if not ckpts:
            log.info("no checkpoint in %s: starting from step 0", self.run_dir)
            return 0
        state = load_checkpoint(ckpts[-1], self.model, self.trainer, self.critic)
        self.step = state["step"]
        self.cursor = PromptCursor(self.train_examples, self.cursor.seed, **state["cursor"])
        self.engine.update_weights(self.model.state_dict(), state["version"])
        self.eval_before = state.get("eval_before")
        self.kl.controller.load_state_dict({"value": state["kl_coef"]})
        self.trainer.kl_coef = self.kl.beta
        self.advantages.load_state_dict(state["reward_moments"])
        log.info("resumed from %s (step %d)", ckpts[-1], self.step)
        return self.step

    def _held_out(self) -> dict:
        """Eval metrics on the held-out split; the same sampling seed every time, so evals compare."""
        return evaluate(self.engine, self.tokenizer, self.eval_examples, self.cfg, seed=step_seed(self.cfg.train.seed, -1))

    def rollout_and_train(self) -> dict:
        """One RL step: sample and score groups, filter, compute advantages, update, sync weights."""
        cfg = self.cfg
        t0 = time.perf_counter()
        sampled, kept, rounds = collect_groups(self.engine, self.tokenizer, self.cursor, cfg, step_seed(cfg.train.seed, self.step))
        t_rollout = time.perf_counter() - t0
        train_metrics: dict[str, float] = {}
        if kept.examples:
            train_metrics = self._update(kept)
        else:
            log.warning("step %d: no informative group after %d refills; no update this step", self.step + 1, rounds)
        t_train = time.perf_counter() - t0 - t_rollout
        self.step += 1
        self.engine.update_weights(self.model.state_dict(), self.step)
        for line in sampled.errors[:3]:
            log.warning("step %d: reward failed: %s", self.step, line)
        if sampled.errors:
            self._last_reward_error = sampled.errors[0]
        record = {"step": self.step, **_rollout_metrics(sampled), **train_metrics}
        if cfg.filters.dynamic_sampling:
            record.update({"filter/kept_groups": len(kept.examples), "filter/sampled_groups": len(sampled.examples),
                           "filter/refill_rounds": rounds})
        tokens = sum(len(c.token_ids) for c in sampled.completions)
        record.update({"time/rollout_s": t_rollout, "time/train_s": t_train,
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
        if token_kl is not None:
            metrics.update(self.kl.update(token_kl, batch.mask))
        elif algo.kl_target is not None and "kl" in metrics:
            self.kl.controller.update(metrics["kl"], n_steps=batch.size)
            self.trainer.kl_coef = self.kl.beta
            metrics["kl/coef"] = self.kl.beta
        return metrics

    def _checkpoint(self) -> None:
        state = {"cursor": self.cursor.state(), "version": self.engine.version, "eval_before": self.eval_before,
                 "kl_coef": self.kl.beta, "reward_moments": self.advantages.state_dict()}
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.trainer, state, self.cfg.checkpoint.keep, self.critic)
        log.info("step %d: checkpoint saved to %s", self.step, path)

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.step == 0 and cfg.eval.before:
            self.eval_before = self._held_out()
            self.logger.log_metrics({"step": 0, **self.eval_before})
            log.info("held-out accuracy before training: %.3f", self.eval_before["eval/accuracy"])
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", disable=not cfg.log.progress, dynamic_ncols=True)
        eval_after = None
        with _StopOnInterrupt() as interrupt:
            while self.step < cfg.train.steps and not interrupt.requested:
                record = self.rollout_and_train()
                self._check_reward_failures(record)
                last = self.step == cfg.train.steps
                if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    eval_after = self._held_out()
                    record.update(eval_after)
                    log.info("step %d: held-out accuracy %.3f", self.step, eval_after["eval/accuracy"])
                self.logger.log_metrics(record)
                if last or interrupt.requested or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self._checkpoint()
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward/mean']:.3f}", loss=f"{record.get('loss', 0.0):.4f}", **(
                    {"eval": f"{record['eval/accuracy']:.3f}"} if "eval/accuracy" in record else {}))
        bar.close()
        self.logger.close()
        plot_run(self.run_dir)
        if interrupt.requested:
            log.info("interrupted: stopped after step %d with a checkpoint; continue with --resume", self.step)
        return TrainResult(self.run_dir, self.eval_before, eval_after, self.step)

    def _check_reward_failures(self, record: dict) -> None:
        """Stop when the reward fails on every sample for several steps: that is a bug, not bad luck."""
        all_failed = record["reward/failed"] == record["rollout/samples"]
        self._all_failed_streak = self._all_failed_streak + 1 if all_failed else 0
        if self._all_failed_streak >= self.cfg.reward.max_all_failed_steps:
            raise RuntimeError(
                f"the reward failed on every sample for {self._all_failed_streak} steps in a row "
                f"(last error: {self._last_reward_error}); see the log and fix reward.functions"
            )


class _StopOnInterrupt:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> TrainResult:
    """Train per `cfg` into `run_dir` (continuing from its latest checkpoint with `resume`)."""
    return RLVRPipeline(cfg, run_dir, resume=resume).run()
