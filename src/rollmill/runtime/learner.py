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
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file

from rollmill.algos import CRITIC_ADVANTAGES
from rollmill.config import RunConfig
from rollmill.models import load_model
from rollmill.models.device import role_device
from rollmill.models.load import base_model_reference
from rollmill.models.lora import (ADAPTER_CONFIG, adapter_config_json, adapter_file_state, adapter_model_state,
                                  add_adapters, lora_scalings, merged_weights)
from rollmill.pipelines import PIPELINES
from rollmill.pipelines.common import seed_everything
from rollmill.train import PolicyTrainer
from rollmill.train.checkpoint import (ADAPTER_FILE, MODEL_FILE, folder_files, gather_optimizer, gather_weights,
                                       read_checkpoint, read_model_file, restore_optimizer, restore_weights,
                                       tied_names, write_checkpoint)
from rollmill.train.parallel import DataParallel, shard_model
from rollmill.train.advantage_computer import AdvantageComputer
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
PER_GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "opo", "remax")


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
    if algo.anchor_credit != "none":
        reasons.append(f"algorithm.anchor_credit {algo.anchor_credit!r} rescales advantages over the whole batch")
    if cfg.runtime.learner.ranks > 1:
        reasons.append(f"runtime.learner.ranks={cfg.runtime.learner.ranks}: data-parallel ranks train shares of a whole batch")
    options = PIPELINES[cfg.pipeline].trainer_options(cfg)
    return reasons + stream_blockers(train, effective_algorithm(cfg), options.get("max_new_tokens"),
                                     options.get("segment_mismatch_bound"))


class Learner:
    """Owns the policy being trained and applies one update per batch of groups.

    The policy lives on `runtime.learner.device` (else `model.device`), optionally with LoRA adapters
    (`model.lora`) and sharded over data-parallel ranks (`runtime.learner.ranks`: each rank is one
    Learner in its own process, the torch.distributed group already initialized; docs/scale.md)."""

    def __init__(self, cfg: RunConfig):
        self.threads = cfg.runtime.learner.threads or torch.get_num_threads()
        seed_everything(cfg.train.seed)
        self.cfg = cfg
        self.pipeline = PIPELINES[cfg.pipeline]
        self.device = role_device(cfg, "learner")
        self.model, tokenizer = load_model(cfg.model)
        self.model.to(self.device)
        self.pad_id = tokenizer.pad_token_id
        self.tied = tied_names(self.model)
        # config and tokenizer files, so each checkpoint folder is one transformers opens (checkpoint.py)
        self.folder_files = folder_files(self.model, tokenizer, with_config=not cfg.model.lora.rank)
        self.adapters = add_adapters(self.model, cfg.model.lora) if cfg.model.lora.rank else None
        self.scalings = lora_scalings(self.model) if self.adapters is not None else {}
        # hf engines take the adapted layers alone (the rest of their base never changes); vLLM is sent everything
        self.changed_only = self.adapters is not None and cfg.rollout.engine != "vllm"
        algo = effective_algorithm(cfg)
        ref, ref_context = None, nullcontext
        if algo.kl_coef > 0 or algo.track_kl or self.pipeline.needs_reference:
            if self.adapters is not None:  # the base with its adapters off: no second copy of the weights
                ref, ref_context = self.model, self.adapters.disable_adapter
            else:
                ref = copy.deepcopy(self.model).requires_grad_(False)
        self.parallel = DataParallel.current()
        # the value model starts as a copy of the unsharded policy body, then shards itself
        self.critic = (CriticTrainer(self.model, cfg.train, algo, self.parallel,
                                     self.pipeline.trainer_options(cfg).get("max_new_tokens"))
                       if algo.advantage in CRITIC_ADVANTAGES else None)
        if self.parallel is not None:
            shard_model(self.model)  # before the optimizer exists: it must hold the sharded parameters
        self.trainer = PolicyTrainer(self.model, cfg.train, algo, temperature=cfg.rollout.sampling.temperature,
                                     ref_model=ref, ref_context=ref_context, parallel=self.parallel,
                                     **self.pipeline.trainer_options(cfg))
        self.kl = KLControl(algo)
        self.advantages = AdvantageComputer(algo)
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
        if self.device.type == "cuda":  # engines on this process's device count too (local backend)
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
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

    @property
    def is_writer(self) -> bool:
        """Whether this learner writes checkpoints and hands out weights (rank 0, or the only one)."""
        return self.parallel is None or self.parallel.rank == 0

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights the engines need, by transformers name: everything, or with LoRA the merged adapted
        layers (all of them merged for vLLM). A collective under data parallelism: every rank calls it,
        rank 0 gets the weights, the others {}. Plain weights are by reference (`snapshot` copies)."""
        if self.parallel is None and self.adapters is None:
            return self.model.state_dict()
        state = self.model.state_dict() if self.parallel is None else gather_weights(self.model)
        if not state or self.adapters is None:
            return state
        return merged_weights(state, self.scalings, adapted_only=self.changed_only)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of `weights()` that later updates leave alone."""
        return {name: t.detach().clone() for name, t in self.weights().items()}

    def save(self, ckpt_root: Path, step: int, loop_state: dict, keep: int, files: dict[str, bytes]) -> Path | None:
        """Checkpoint the training side with the driver's `loop_state` and other roles' `files`. Under data
        parallelism every rank gathers, rank 0 writes and returns the path (the others None)."""
        weights = gather_weights(self.model)
        blob = {"optimizer": gather_optimizer(self.model, self.trainer.optimizer),
                "scheduler": self.trainer.scheduler.state_dict()}
        if self.critic is not None:  # gathered like the policy (collectives under data parallelism)
            critic_weights = gather_weights(self.critic.model)
            critic_optimizer = gather_optimizer(self.critic.model, self.critic.optimizer)
        if not self.is_writer:
            return None
        files = {**self.folder_files, **files}
        if self.adapters is not None:
            tensors = {ADAPTER_FILE: adapter_file_state(weights)}
            files[ADAPTER_CONFIG] = adapter_config_json(self.adapters, base_model_reference(self.cfg.model))
        else:
            tensors = {MODEL_FILE: {k: v for k, v in weights.items() if k not in self.tied}}
        if self.critic is not None:
            tensors["critic.safetensors"] = critic_weights
            blob["critic_optimizer"] = critic_optimizer
        state = {**loop_state, "version": self.version, "kl_coef": self.kl.beta,
                 "reward_moments": self.advantages.state_dict()}
        return write_checkpoint(ckpt_root, step, tensors, blob, state, keep, files)

    def load(self, path: Path) -> dict:
        """Restore from checkpoint `path` (written by any number of ranks); return the rest of its loop state."""
        own = set(self.model.state_dict())
        if self.adapters is not None:
            restore_weights(self.model, adapter_model_state(load_file(str(path / ADAPTER_FILE))),
                            {k for k in own if ".lora_" in k}, str(path))
        else:
            restore_weights(self.model, read_model_file(path, self.tied), own - self.tied.keys(), str(path))
        blob, state = read_checkpoint(path)
        restore_optimizer(self.model, self.trainer.optimizer, blob["optimizer"])
        self.trainer.scheduler.load_state_dict(blob["scheduler"])
        if self.critic is not None:
            restore_weights(self.critic.model, load_file(str(path / "critic.safetensors")),
                            set(self.critic.model.state_dict()), str(path))
            restore_optimizer(self.critic.model, self.critic.optimizer, blob["critic_optimizer"])
        self.version = state["version"]
        self.kl.controller.load_state_dict({"value": state["kl_coef"]})
        self.trainer.kl_coef = self.kl.beta
        self.advantages.load_state_dict(state["reward_moments"])
        return state
