"""The learner role: groups of trajectories -> advantages -> one policy update -> weights version v+1.

Built from the config alone: it loads its own copy of the policy, so it can live in another process
(a Ray actor) than the rollout workers. It owns everything a checkpoint of the training side holds:
weights, optimizer, LR schedule, reference model, critic, KL coefficient, running reward moments.

An update is either `train(groups)`, or streamed: `begin_stream()`, `add_groups(...)` as groups finish
(their forward/backward runs at once), `finish_stream()`; `streaming_blockers` says when a config's
update has a streamed form that is the same update.
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
from rollmill.train.trainer import stream_blockers
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


# Estimators whose advantages for a group depend on that group's rewards alone, so that groups trained
# in chunks get the advantages the whole batch would give them; batch and running statistics do not.
PER_GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo")


def streaming_blockers(cfg: RunConfig) -> list[str]:
    """Each reason this config's update cannot be streamed (`Learner.begin_stream`); empty if it can.

    Streamed, every group's advantages and loss weights are computed from its chunk alone and its
    forward/backward runs before the batch is complete, so anything computed over the whole batch
    first (batch advantage statistics, whitening, a critic, reward-side KL, attention credit, several
    passes, the mismatch filter) rules it out. Unknown cases are refused, not guessed.
    """
    algo, train = cfg.algorithm, cfg.train
    reasons = []
    if cfg.pipeline != "rlvr":
        reasons.append(f"pipeline {cfg.pipeline!r}: only rlvr has a streamed update")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if train.mini_batch_size is not None and train.mini_batch_size < batch:
        reasons.append(f"train.mini_batch_size={train.mini_batch_size} < the batch ({batch} samples): several steps")
    if algo.advantage in CRITIC_ADVANTAGES:
        reasons.append(f"advantage {algo.advantage!r} needs a critic's values over the whole batch")
    elif algo.advantage == "normalized":
        kinds = {algo.norm_mean, algo.norm_std} - {None, "group"}
        if kinds:
            reasons.append(f"advantage 'normalized' with {sorted(kinds)} statistics (only group ones are per group)")
    elif algo.advantage not in PER_GROUP_ADVANTAGES:
        reasons.append(f"advantage {algo.advantage!r} is not computed per group")
    if algo.whiten_advantages:
        reasons.append("algorithm.whiten_advantages whitens over the whole batch")
    if algo.kl_placement == "reward" and algo.kl_coef > 0:
        reasons.append("kl_placement 'reward' folds the KL into the scores before the advantages")
    if algo.credit != "none":
        reasons.append(f"algorithm.credit {algo.credit!r} rescales advantages over the whole batch")
    options = PIPELINES[cfg.pipeline].trainer_options(cfg)
    return reasons + stream_blockers(train, effective_algorithm(cfg), options.get("max_new_tokens"),
                                     options.get("segment_mismatch_bound"))


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
        self._stream: dict | None = None  # a streamed update in progress: its sample count, oldest versions

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
        self._report_staleness(metrics, oldest)
        self.version += 1
        return metrics

    @property
    def can_stream(self) -> bool:
        """Whether this config's update has a streamed form (`begin_stream`); `streaming_blockers` says why not."""
        return not streaming_blockers(self.cfg)

    def begin_stream(self) -> None:
        """Start a streamed update: groups come through `add_groups`, `finish_stream` applies it.

        Gives the same update as `train` on all the groups (up to float summation order), whatever
        the order and chunking of the groups. An unfinished streamed update is discarded. Raises
        ValueError naming each reason if the config does not allow it."""
        reasons = streaming_blockers(self.cfg)
        if reasons:
            raise ValueError("this config cannot train streamed: " + "; ".join(reasons))
        self.trainer.version = self.version
        self.trainer.begin_stream()
        self._stream = {"samples": 0, "oldest": set()}

    def add_groups(self, groups: list[list[Trajectory]]) -> None:
        """Forward/backward on these finished groups now (their advantages computed per group)."""
        torch.set_num_threads(self.threads)
        if self._stream is None:
            raise RuntimeError("add_groups() outside a streamed update: call begin_stream() first")
        if not groups:
            return
        self._stream["oldest"].update(t.oldest_version for g in groups for t in g if t.oldest_version is not None)
        self._stream["samples"] += sum(len(g) for g in groups)
        self.pipeline.add_groups(self, groups)

    def finish_stream(self) -> dict[str, float]:
        """Apply the streamed update; returns `train`'s metrics, and the weights become version v + 1
        (also with no groups added: the step then changes nothing, as `train([])`)."""
        torch.set_num_threads(self.threads)
        if self._stream is None:
            raise RuntimeError("finish_stream() outside a streamed update: call begin_stream() first")
        stream, self._stream = self._stream, None
        metrics = self.trainer.finish_stream()
        if stream["samples"]:
            self._check_consistency(metrics)
            self._adapt_loss_kl(metrics, stream["samples"])
            self._report_staleness(metrics, min(stream["oldest"], default=None))
        self.version += 1
        return metrics

    def after_update(self, metrics: dict, token_kl, batch) -> None:
        """The checks and controllers every update runs: train/inference consistency, adaptive KL."""
        self._check_consistency(metrics)
        if token_kl is not None:
            metrics.update(self.kl.update(token_kl, batch.mask))
        else:
            self._adapt_loss_kl(metrics, batch.size)

    def _check_consistency(self, metrics: dict) -> None:
        rollout = self.cfg.rollout
        if "logprob_mismatch" in metrics:
            check_logprob_gap(metrics["logprob_mismatch"], self.engine_name, rollout.logprob_tolerance,
                              rollout.logprob_check, rollout.sampling.top_p)

    def _adapt_loss_kl(self, metrics: dict, samples: int) -> None:
        """Move the loss-side KL coefficient toward algorithm.kl_target, when one is set."""
        if self.trainer.algo.kl_target is not None and "kl" in metrics:
            self.kl.controller.update(metrics["kl"], n_steps=samples)
            self.trainer.kl_coef = self.kl.beta
            metrics["kl/coef"] = self.kl.beta

    def _report_staleness(self, metrics: dict, oldest: int | None) -> None:
        """How many versions old the oldest trained token was (asynchronous runs)."""
        if oldest is not None and self.cfg.async_.max_staleness > 0:
            metrics["async/staleness_max"] = float(self.version - oldest)

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
