"""The critic for PPO with GAE: a value model, its optimizer, and GAE advantages for a batch.

The value model is a copy of the policy's transformer body with a scalar head (initialized to
zero, so the first advantages equal the returns). V_t is read at the position that predicts
completion token t, i.e. the state before that token is generated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from rollmill.algos.gae import gae_advantages, token_rewards_from_outcome, value_loss
from rollmill.algos.normalize import advantage_clip, whiten
from rollmill.config import AlgorithmConfig, TrainConfig
from rollmill.train.batch import TrainBatch
from rollmill.train.parallel import DataParallel, gather_rows, local_value, shard_model


class ValueModel(nn.Module):
    """A transformer body plus a linear value head; `forward(batch)` gives values [B, C]."""

    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        self.body = copy.deepcopy(policy.get_decoder())
        # the head in float32 at least, whatever the body's dtype (a bf16 value head rounds every value)
        dtype = torch.promote_types(next(self.body.parameters()).dtype, torch.float32)
        self.head = nn.Linear(policy.config.hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        hidden = self.body(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False,
        ).last_hidden_state
        start = batch.prompt_width - 1
        return self.head(hidden[:, start : start + batch.completion_width].to(self.head.weight.dtype)).squeeze(-1)


class CriticTrainer:
    """Owns the value model and its optimizer; fits values to GAE returns with the same schedule
    (epochs, mini-batches, micro-batches) as the policy, the value loss aggregated by
    `algorithm.value_loss_agg` over each mini-batch."""

    def __init__(self, policy: PreTrainedModel, train_cfg: TrainConfig, algo_cfg: AlgorithmConfig,
                 parallel: DataParallel | None = None, norm_length: int | None = None):
        """`policy` unsharded (the value model starts as a copy of its body); with `parallel` the value
        model is sharded over the data-parallel group and each rank fits its share of every batch, as
        the policy trainer does (train/parallel.py). `norm_length` is the constant length of the
        seq-mean-token-sum-norm aggregation (None: the batch's completion width)."""
        self.device = policy.get_output_embeddings().weight.device
        self.model = ValueModel(policy).to(self.device)
        self.parallel = parallel
        if parallel is not None:
            shard_model(self.model, getattr(policy, "_no_split_modules", None))
        self.cfg = train_cfg
        self.algo = algo_cfg
        self.norm_length = norm_length
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=algo_cfg.critic_lr, betas=train_cfg.betas)

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        """V [B, C] on the critic's device (0 off the mask); with data parallelism each rank computes its
        rows and every rank gets them all."""
        batch = batch.to(self.device)
        if self.parallel is None:
            return torch.cat([self.model(mb) for _, mb in batch.micro_batches(self.cfg.micro_batch_size)]) * batch.mask
        index, keep, _ = self.parallel.rows(batch.size, batch.size)
        local = batch.select(index.to(self.device))
        values = torch.cat([self.model(mb) for _, mb in local.micro_batches(self.cfg.micro_batch_size)])
        return gather_rows(values, index, keep, batch.size).to(self.device) * batch.mask

    def advantages(
        self, batch: TrainBatch, outcome: torch.Tensor, token_kl: torch.Tensor | None = None, beta: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token advantages, returns, old values) for `batch` whose sequences scored `outcome` [B];
        `token_kl` with `beta` adds the reward-side KL penalty to every token's reward. On the host."""
        old_values = self.values(batch).cpu()
        rewards = token_rewards_from_outcome(outcome, batch.mask, kl=token_kl, beta=beta)
        adv, returns = gae_advantages(rewards, old_values, batch.mask, self.algo.gamma, self.algo.lam)
        if self.algo.whiten_advantages:
            adv = whiten(adv, batch.mask, self.algo.std_eps)
        return advantage_clip(adv, self.algo.advantage_clip) * batch.mask, returns, old_values

    def step(self, batch: TrainBatch, old_values: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """Fit the value model; returns the mean value loss and gradient norm over optimizer steps."""
        batch, old_values, returns = batch.to(self.device), old_values.to(self.device), returns.to(self.device)
        value_mean = float((old_values * batch.mask).sum() / batch.mask.sum().clamp(min=1))
        mini = self.cfg.mini_batch_size or batch.size
        if self.parallel is not None:  # this rank's share of each mini-batch, as the policy trainer takes it
            batch, index, mini = self.parallel.shard(batch, mini)
            old_values, returns = old_values[index], returns[index]
        losses, norms = [], []
        self.model.train()
        for _ in range(self.cfg.ppo_epochs):
            for start in range(0, batch.size, mini):
                losses.append(self._optimizer_step(batch, old_values, returns, slice(start, start + mini)))
                norms.append(local_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)))
                self.optimizer.step()
        self.model.eval()
        if self.parallel is not None:
            losses = self.parallel.sum(losses)
        return {"value_loss": sum(losses) / len(losses), "critic/grad_norm": sum(norms) / len(norms),
                "critic/value_mean": value_mean}

    def _optimizer_step(self, batch, old_values, returns, mini: slice) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        mb = batch.select(mini)
        counts = [float(mb.mask.sum()), float((mb.mask.sum(-1) > 0).sum())]
        tokens, seqs = counts if self.parallel is None else self.parallel.sum(counts)
        # the mini-batch's denominators (all ranks'), so the micro-batch losses add up to its loss
        agg = dict(mode=self.algo.value_loss_agg, num_tokens=tokens, num_seqs=seqs,
                   norm_length=self.norm_length or mb.completion_width)
        loss_sum = 0.0
        for sl, micro in mb.micro_batches(self.cfg.micro_batch_size):
            loss = value_loss(self.model(micro), old_values[mini][sl], returns[mini][sl], micro.mask,
                              self.algo.value_clip, **agg)
            loss.backward()
            loss_sum += float(loss.detach())
        return loss_sum
