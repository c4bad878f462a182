"""Preference training from the policy's own samples: pairs picked by the verifier, one DPO update.

`verified_pairs` turns scored groups into (chosen, rejected) pairs of the same prompt; `preference_step`
applies one optimizer step of a `rollmill.algos.preference` loss to them, with the reference's
log-probs computed once per pair (they never change: the reference is frozen). The math is in
docs/algorithms.md §6.
"""

from __future__ import annotations

import time

import torch

from rollmill.algos.preference import preference_loss
from rollmill.train.batch import TrainBatch, build_batch
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.trainer import PolicyTrainer
from rollmill.types import Trajectory


def verified_pairs(groups: list[list[Trajectory]], per_group: int) -> list[tuple[Trajectory, Trajectory]]:
    """Up to `per_group` pairs per group: samples with the group's highest reward against samples with
    its lowest, matched in sample order. A group whose rewards are all equal (or that has a failed
    sample: its score says nothing) gives none."""
    pairs = []
    for group in groups:
        if any(t.failed for t in group):
            continue
        rewards = [t.reward for t in group]
        best, worst = max(rewards), min(rewards)
        if best == worst:
            continue
        chosen = [t for t in group if t.reward == best]
        rejected = [t for t in group if t.reward == worst]
        pairs += list(zip(chosen, rejected))[:per_group]
    return pairs


def preference_step(trainer: PolicyTrainer, chosen: TrainBatch, rejected: TrainBatch, loss: str, beta: float,
                    label_smoothing: float, micro_batch_size: int) -> dict[str, float]:
    """One optimizer step of preference loss `loss` on pairs (row i of `chosen` with row i of `rejected`),
    the loss being the mean over pairs; micro-batches of `micro_batch_size` pairs accumulate gradients."""
    t0 = time.perf_counter()
    model, device, pairs = trainer.model, trainer.device, chosen.size
    ref = {"ref_chosen": trainer.reference_logprobs(chosen), "ref_rejected": trainer.reference_logprobs(rejected)}
    sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_accuracy": 0.0}
    trainer.optimizer.zero_grad(set_to_none=True)
    model.train()
    for start in range(0, pairs, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        c, r = chosen.select(rows).to(device), rejected.select(rows).to(device)
        logps = {"chosen": completion_logprobs(model, c, trainer.temperature)[0],
                 "rejected": completion_logprobs(model, r, trainer.temperature)[0],
                 **{k: v[rows].to(device) for k, v in ref.items()}}
        out = preference_loss(loss, logps, {"chosen": c.mask, "rejected": r.mask}, beta, label_smoothing)
        (out.loss.sum() / pairs).backward()
        sums["loss"] += float(out.loss.detach().sum())
        sums["chosen_reward"] += float(out.chosen_reward.sum())
        sums["rejected_reward"] += float(out.rejected_reward.sum())
        sums["reward_accuracy"] += float((out.chosen_reward > out.rejected_reward).sum())
    model.eval()
    grad_norm = trainer.apply_gradients()
    trainer.scheduler.step()
    metrics = {f"dpo/{k}": v / pairs for k, v in sums.items()}
    metrics["dpo/reward_margin"] = metrics["dpo/chosen_reward"] - metrics["dpo/rejected_reward"]
    return {**metrics, "loss": metrics["dpo/loss"], "dpo/pairs": float(pairs), "grad_norm": grad_norm,
            "lr": trainer.scheduler.get_last_lr()[0], "time/update_s": time.perf_counter() - t0}


def pair_batches(pairs: list[tuple[Trajectory, Trajectory]], pad_id: int) -> tuple[TrainBatch, TrainBatch]:
    """The chosen and the rejected replies as two batches, row i of each from pair i."""
    zeros = torch.zeros(len(pairs))
    return (build_batch([c.rows[0] for c, _ in pairs], zeros, pad_id),
            build_batch([r.rows[0] for _, r in pairs], zeros, pad_id))
