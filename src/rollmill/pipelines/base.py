"""What every RL pipeline shares: building the model, engine and trainer; the step loop with its
evaluation, checkpoints, exact resume, Ctrl-C handling, progress bar, metrics and plots.

A pipeline subclass says where its data comes from (`_load_data`, `_data_state`, `_restore_data`),
how one step rolls out and trains (`rollout_and_train`) and how it is evaluated (`_held_out`).
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
from rollmill.pipelines.common import seed_everything
from rollmill.rollout import build_engine, sync_weights
from rollmill.rollout.consistency import check_logprob_gap
from rollmill.track import RunLogger, plot_run
from rollmill.train import PolicyTrainer, list_checkpoints, load_checkpoint, save_checkpoint
from rollmill.train.advantages import AdvantageComputer
from rollmill.train.critic import CriticTrainer
from rollmill.train.kl_control import KLControl

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    steps: int


class BasePipeline:
    """Owns one run: its model, engine, trainer and run directory."""

    headline = "eval/accuracy"  # the eval metric shown in logs and the progress bar

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, **trainer_options):
        self.cfg = cfg
        self.run_dir = run_dir
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self._load_data()  # bad data fails before the model loads
        self.model, self.tokenizer = load_model(cfg.model)
        ref = None
        if cfg.algorithm.kl_coef > 0 or cfg.algorithm.track_kl:
            ref = copy.deepcopy(self.model).requires_grad_(False)
        self.engine = build_engine(cfg.rollout, self.model, self.tokenizer)
        trainer_options.setdefault("max_new_tokens", cfg.rollout.sampling.max_new_tokens)
        self.trainer = PolicyTrainer(self.model, cfg.train, cfg.algorithm, temperature=cfg.rollout.sampling.temperature,
                                     ref_model=ref, **trainer_options)
        self.kl = KLControl(cfg.algorithm)
        self.advantages = AdvantageComputer(cfg.algorithm)
        needs_critic = cfg.algorithm.advantage in CRITIC_ADVANTAGES
        self.critic = CriticTrainer(self.model, cfg.train, cfg.algorithm) if needs_critic else None
        self.step = 0
        self.eval_before: dict | None = None
        run_dir.mkdir(parents=True, exist_ok=True)
        resume_step = self._resume() if resume else None
        dump_config(cfg, run_dir / "config.yaml")
        self.logger = RunLogger(run_dir, tensorboard=cfg.log.tensorboard, resume_step=resume_step)

    # -- hooks -----------------------------------------------------------------------------------
    def _load_data(self) -> None:
        raise NotImplementedError

    def _data_state(self) -> dict:
        """Where the data stream stands (saved in checkpoints)."""
        raise NotImplementedError

    def _restore_data(self, state: dict) -> None:
        raise NotImplementedError

    def rollout_and_train(self) -> dict:
        """One RL step; returns the step's metrics record (with "step")."""
        raise NotImplementedError

    def _held_out(self) -> dict:
        raise NotImplementedError

    def _check_health(self, record: dict) -> None:
        """Raise when the run cannot learn anything (e.g. every reward failing)."""

    # -- shared machinery ------------------------------------------------------------------------
    def _resume(self) -> int:
        ckpts = list_checkpoints(self.run_dir / "checkpoints")
        if not ckpts:
            log.info("no checkpoint in %s: starting from step 0", self.run_dir)
            return 0
        state = load_checkpoint(ckpts[-1], self.model, self.trainer, self.critic)
        self.step = state["step"]
        self._restore_data(state)
        sync_weights(self.engine, self.model.state_dict(), state["version"], self.cfg.rollout.weight_sync_timeout_s)
        self.eval_before = state.get("eval_before")
        self.kl.controller.load_state_dict({"value": state["kl_coef"]})
        self.trainer.kl_coef = self.kl.beta
        self.advantages.load_state_dict(state["reward_moments"])
        log.info("resumed from %s (step %d)", ckpts[-1], self.step)
        return self.step

    def _checkpoint(self) -> None:
        state = {**self._data_state(), "version": self.engine.version, "eval_before": self.eval_before,
                 "kl_coef": self.kl.beta, "reward_moments": self.advantages.state_dict()}
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.trainer, state,
                               self.cfg.checkpoint.keep, self.critic)
        log.info("step %d: checkpoint saved to %s", self.step, path)

    def _sync_weights(self) -> float:
        """Push the trainer's weights to the engine as version `self.step`; return the seconds it took."""
        t0 = time.perf_counter()
        sync_weights(self.engine, self.model.state_dict(), self.step, self.cfg.rollout.weight_sync_timeout_s)
        return time.perf_counter() - t0

    def _check_consistency(self, metrics: dict) -> None:
        """Warn or stop (rollout.logprob_check) when the engine's log-probs leave the trainer's."""
        rollout = self.cfg.rollout
        if "logprob_mismatch" in metrics:
            check_logprob_gap(metrics["logprob_mismatch"], getattr(self.engine, "name", "rollout"),
                              rollout.logprob_tolerance, rollout.logprob_check, rollout.sampling.top_p)

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.step == 0 and cfg.eval.before:
            self.eval_before = self._held_out()
            self.logger.log_metrics({"step": 0, **self.eval_before})
            log.info("held-out %s before training: %.3f", self.headline, self.eval_before[self.headline])
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", disable=not cfg.log.progress, dynamic_ncols=True)
        eval_after = None
        with _StopOnInterrupt() as interrupt:
            while self.step < cfg.train.steps and not interrupt.requested:
                record = self.rollout_and_train()
                self._check_health(record)
                last = self.step == cfg.train.steps
                if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    eval_after = self._held_out()
                    record.update(eval_after)
                    log.info("step %d: held-out %s %.3f", self.step, self.headline, eval_after[self.headline])
                self.logger.log_metrics(record)
                if last or interrupt.requested or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self._checkpoint()
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward/mean']:.3f}", loss=f"{record.get('loss', 0.0):.4f}", **(
                    {"eval": f"{record[self.headline]:.3f}"} if self.headline in record else {}))
        bar.close()
        self.logger.close()
        plot_run(self.run_dir)
        if interrupt.requested:
            log.info("interrupted: stopped after step %d with a checkpoint; continue with --resume", self.step)
        return TrainResult(self.run_dir, self.eval_before, eval_after, self.step)

    def _apply_kl_control(self, metrics: dict, token_kl, mask, batch_size: int) -> None:
        """Move an adaptive KL coefficient after the update (reward-side or loss-side KL)."""
        algo = self.cfg.algorithm
        if token_kl is not None:
            metrics.update(self.kl.update(token_kl, mask))
        elif algo.kl_target is not None and "kl" in metrics:
            self.kl.controller.update(metrics["kl"], n_steps=batch_size)
            self.trainer.kl_coef = self.kl.beta
            metrics["kl/coef"] = self.kl.beta


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
