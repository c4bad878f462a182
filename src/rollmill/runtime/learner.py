"""The learner role: groups of trajectories -> advantages -> one policy update -> weights version v+1.

Built from the config alone: it loads its own copy of the policy, so it can live in another process
(a Ray actor) than the rollout workers. It owns everything a checkpoint of the training side holds:
weights, optimizer, LR schedule, reference model, critic, KL coefficient, running reward moments.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from rollmill.algos import CRITIC_ADVANTAGES
from rollmill.config import RunConfig
from rollmill.models import load_model
from rollmill.pipelines import PIPELINES
from rollmill.pipelines.common import seed_everything
from rollmill.train import PolicyTrainer, load_checkpoint, save_checkpoint
from rollmill.train.advantages import AdvantageComputer
from rollmill.train.consistency import check_logprob_gap
from rollmill.train.critic import CriticTrainer
from rollmill.train.kl_control import KLControl
from rollmill.types import Trajectory


def effective_algorithm(cfg: RunConfig):
    """The algorithm section with the off-policy correction asynchronous training turns on.

    With max_staleness k > 0 the sampled tokens may come from up to k versions back, so by default
    (`async.off_policy_correction: auto`) the loss is weighted by truncated importance ratios against
    the behaviour log-probs (`algorithm.tis_cap`, or `async.tis_cap` when unset); `decoupled_ppo`
    switches the loss to decoupled PPO instead. Explicit algorithm settings are never overridden.
    """
    algo, mode = cfg.algorithm, cfg.async_.off_policy_correction
    if mode == "auto":
        mode = "tis" if cfg.async_.max_staleness > 0 else "none"
    if mode == "tis" and algo.tis_cap is None:
        return algo.model_copy(update={"tis_cap": cfg.async_.tis_cap})
    if mode == "decoupled_ppo" and algo.loss != "decoupled_ppo":
        return algo.model_copy(update={"loss": "decoupled_ppo"})
    return algo


class Learner:
    """Owns the policy being trained and applies one update per batch of groups."""

    def __init__(self, cfg: RunConfig):
        self.threads = cfg.runtime.learner.threads or torch.get_num_threads()
        seed_everything(cfg.train.seed)
        self.cfg = cfg
        self.pipeline = PIPELINES[cfg.pipeline]
        self.model, tokenizer = load_model(cfg.model)
        self.pad_id = tokenizer.pad_token_id
        algo = effective_algorithm(cfg)
        ref = None
        if algo.kl_coef > 0 or algo.track_kl:
            ref = copy.deepcopy(self.model).requires_grad_(False)
        self.trainer = PolicyTrainer(self.model, cfg.train, algo, temperature=cfg.rollout.sampling.temperature,
                                     ref_model=ref, **self.pipeline.trainer_options(cfg))
        self.kl = KLControl(algo)
        self.advantages = AdvantageComputer(algo)
        self.critic = CriticTrainer(self.model, cfg.train, algo) if algo.advantage in CRITIC_ADVANTAGES else None
        self.version = 0
        self.engine_name = cfg.rollout.engine

    def train(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        """One update on `groups` (group-major); the weights become version `self.version + 1` (also
        with no groups: the step then changes nothing). Reports how stale the oldest trained token was."""
        torch.set_num_threads(self.threads)  # per thread: the local backend trains in a thread of its own
        if not groups:
            self.version += 1
            return {}
        oldest = min((t.oldest_version for g in groups for t in g if t.oldest_version is not None), default=None)
        self.trainer.version = self.version
        metrics = self.pipeline.update(self, groups)
        if oldest is not None and self.cfg.async_.max_staleness > 0:
            metrics["async/staleness_max"] = float(self.version - oldest)
        self.version += 1
        return metrics

    def after_update(self, metrics: dict, token_kl, batch) -> None:
        """The checks and controllers every update runs: train/inference consistency, adaptive KL."""
        rollout = self.cfg.rollout
        if "logprob_mismatch" in metrics:
            check_logprob_gap(metrics["logprob_mismatch"], self.engine_name, rollout.logprob_tolerance,
                              rollout.logprob_check, rollout.sampling.top_p)
        algo = self.trainer.algo
        if token_kl is not None:
            metrics.update(self.kl.update(token_kl, batch.mask))
        elif algo.kl_target is not None and "kl" in metrics:
            self.kl.controller.update(metrics["kl"], n_steps=batch.size)
            self.trainer.kl_coef = self.kl.beta
            metrics["kl/coef"] = self.kl.beta

    def weights(self) -> dict[str, torch.Tensor]:
        """The current weights, by reference (a caller that keeps them past the next update copies them)."""
        return self.model.state_dict()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the current weights that later updates leave alone."""
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def save(self, ckpt_root: Path, step: int, loop_state: dict, keep: int, files: dict[str, bytes]) -> Path:
        """Checkpoint the training side with the driver's `loop_state` and other roles' `files`."""
        state = {**loop_state, "version": self.version, "kl_coef": self.kl.beta,
                 "reward_moments": self.advantages.state_dict()}
        return save_checkpoint(ckpt_root, step, self.model, self.trainer, state, keep, self.critic, files)

    def load(self, path: Path) -> dict:
        """Restore from checkpoint `path`; return the rest of its loop state."""
        state = load_checkpoint(path, self.model, self.trainer, self.critic)
        self.version = state["version"]
        self.kl.controller.load_state_dict({"value": state["kl_coef"]})
        self.trainer.kl_coef = self.kl.beta
        self.advantages.load_state_dict(state["reward_moments"])
        return state
