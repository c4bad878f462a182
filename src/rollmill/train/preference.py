"""Preference training: pairs of replies to one prompt, the reference's log-probs, DPO updates.

`verified_pairs` turns scored groups into (chosen, rejected) pairs of the same prompt (on-policy DPO);
`pair_batch` lays pairs out for one forward; `reply_logps` scores replies without gradients (the frozen
reference once per pair, or the policy on held-out pairs); `preference_update` takes optimizer steps
of a `rollmill.algos.preference` loss against reference log-probs computed beforehand, and
`preference_step` is that update with the reference scored on the spot. The math is in
docs/algorithms.md §6.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from rollmill.algos.preference import PREFERENCE_LOSSES, PreferenceOutput, sequence_logps
from rollmill.train.batch import TrainBatch, build_batch
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.trainer import PolicyTrainer
from rollmill.types import Row, Trajectory


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


def pair_batch(pairs: list[tuple[Row, Row]], pad_id: int) -> TrainBatch:
    """Rows chosen 0, rejected 0, chosen 1, ...: the two replies of a pair side by side. Rows that share a
    prompt are packed after one copy of it (train/logprobs.py), so a pair's prompt is computed once."""
    return build_batch([row for pair in pairs for row in pair], torch.zeros(2 * len(pairs)), pad_id)


@torch.no_grad()
def reply_logps(model, pairs: list[tuple[Row, Row]], pad_id: int, micro_pairs: int, temperature: float = 1.0,
                autocast: torch.dtype | None = None) -> torch.Tensor:
    """[2P] float32 on the CPU: each reply's log-prob under `model` summed over its masked tokens, in
    `pair_batch`'s row order; `micro_pairs` pairs per forward."""
    sums = []
    for start in range(0, len(pairs), micro_pairs):
        batch = pair_batch(pairs[start : start + micro_pairs], pad_id)
        logp = completion_logprobs(model, batch, temperature, autocast=autocast)[0]
        sums.append(sequence_logps(logp, batch.mask.to(logp.device)).float().cpu())
    return torch.cat(sums)


def _loss(name: str, sums: torch.Tensor, ref_sums: torch.Tensor, counts: torch.Tensor, beta: float,
          label_smoothing: float) -> PreferenceOutput:
    """Loss `name` of the pairs whose rows (`pair_batch` order) have log-prob sums `sums` and `ref_sums`
    over `counts` tokens; the per-token-mean losses divide both by the count."""
    fn, average = PREFERENCE_LOSSES[name]
    if average:
        sums, ref_sums = sums / counts.clamp(min=1), ref_sums / counts.clamp(min=1)
    return fn(sums[0::2], sums[1::2], ref_sums[0::2], ref_sums[1::2], beta=beta, label_smoothing=label_smoothing)


def preference_metrics(sums: torch.Tensor, ref_sums: torch.Tensor, counts: torch.Tensor, loss: str, beta: float,
                       label_smoothing: float) -> dict[str, float]:
    """Held-out numbers of pairs from their rows' log-prob sums under the policy and the reference:
    the mean loss, `preference_accuracy` (the share of pairs whose margin h is above 0: the policy
    moved toward chosen more than toward rejected) and the mean `reward_margin` beta * h."""
    out = _loss(loss, sums, ref_sums, counts, beta, label_smoothing)
    margin = out.chosen_reward - out.rejected_reward
    return {"loss": float(out.loss.mean()), "preference_accuracy": float((margin > 0).float().mean()),
            "reward_margin": float(margin.mean())}


def preference_update(trainer: PolicyTrainer, batch: TrainBatch, ref_sums: torch.Tensor, loss: str, beta: float,
                      label_smoothing: float, micro_pairs: int, epochs: int = 1) -> dict[str, float]:
    """`epochs` optimizer steps of preference loss `loss` on the pairs of `batch` (`pair_batch`), against
    the reference's per-row log-prob sums `ref_sums` [2P], computed once before (whatever `epochs`). The
    loss is the mean over pairs; micro-batches of `micro_pairs` pairs accumulate gradients; the LR
    schedule moves once. Metrics are means over the epochs; `lr` is the rate the steps used."""
    model, device, pairs = trainer.model, trainer.device, batch.size // 2
    counts = batch.mask.sum(-1)
    lr = trainer.scheduler.get_last_lr()[0]
    sums: dict[str, float] = defaultdict(float)
    grad_norms = []
    for _ in range(epochs):
        trainer.optimizer.zero_grad(set_to_none=True)
        model.train()
        for start in range(0, batch.size, 2 * micro_pairs):
            rows = slice(start, start + 2 * micro_pairs)
            micro = batch.select(rows).to(device)
            logp = completion_logprobs(model, micro, trainer.temperature, autocast=trainer.autocast)[0]
            out = _loss(loss, sequence_logps(logp, micro.mask), ref_sums[rows].to(logp), counts[rows].to(logp.device),
                        beta, label_smoothing)
            (out.loss.sum() / pairs).backward()
            sums["loss"] += float(out.loss.detach().sum())
            sums["chosen_reward"] += float(out.chosen_reward.sum())
            sums["rejected_reward"] += float(out.rejected_reward.sum())
            sums["reward_accuracy"] += float((out.chosen_reward > out.rejected_reward).sum())
        model.eval()
        grad_norms.append(trainer.apply_gradients())
    trainer.scheduler.step()
    metrics = {f"dpo/{k}": v / (pairs * epochs) for k, v in sums.items()}
    metrics["dpo/reward_margin"] = metrics["dpo/chosen_reward"] - metrics["dpo/rejected_reward"]
    return {**metrics, "loss": metrics["dpo/loss"], "dpo/pairs": float(pairs),
            "grad_norm": sum(grad_norms) / epochs, "lr": lr}


def preference_step(trainer: PolicyTrainer, batch: TrainBatch, loss: str, beta: float, label_smoothing: float,
                    micro_pairs: int, epochs: int = 1) -> dict[str, float]:
    """`preference_update` on the pairs of `batch`, the trainer's reference scoring each reply once first."""
    t0 = time.perf_counter()
    ref_sums = sequence_logps(trainer.reference_logprobs(batch), batch.mask)
    t1 = time.perf_counter()
    metrics = preference_update(trainer, batch, ref_sums, loss, beta, label_smoothing, micro_pairs, epochs)
    return {**metrics, "time/ref_logprobs_s": t1 - t0, "time/update_s": time.perf_counter() - t0}
