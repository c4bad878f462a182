"""The policy update: log-probs, the configured loss from `rollmill.algos`, AdamW, micro-batching.

One `step(batch)` = `ppo_epochs` passes over the rollout batch, each split into mini-batches
(one optimizer step each) and micro-batches (gradient accumulation). Loss denominators are the
mini-batch totals, so micro-batching changes memory, never the math.

A streamed update (`begin_stream`, `add` per chunk, `finish_stream`) is the single-pass `step` with
its batch arriving in chunks: each chunk's forward/backward runs as it comes, on the numerator of
the loss, and the summed gradients are scaled by the batch's denominators once they are known.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from transformers import PreTrainedModel

from rollmill.algos import POLICY_LOSSES, aggregate_loss, kl_estimate
from rollmill.algos.agentic import segment_log_ratio, segment_mismatch_mask
from rollmill.algos.aggregation import count_seqs
from rollmill.algos.clip_alternatives import gpg_alpha, valid_rows
from rollmill.algos.kl import importance_weighted_kl
from rollmill.algos.losses import PolicyLossOutput, loss_param_names, masked_log_ratio, mismatch_mask, tis_weights
from rollmill.config import AlgorithmConfig, TrainConfig
from rollmill.train.batch import TrainBatch
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.parallel import DataParallel, local_value


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def loss_params(algo: AlgorithmConfig, **inputs: Any) -> dict[str, Any]:
    """Keyword arguments for the selected loss: each of its parameters from `inputs` (per-batch
    tensors the trainer holds, e.g. behaviour_logp) or else from the algorithm field of the same name."""
    names = loss_param_names(POLICY_LOSSES[algo.loss])
    return {n: inputs[n] if n in inputs else getattr(algo, n) for n in names}


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x * mask with masked positions exactly 0, also where x is not finite there (padding may hold -inf)."""
    return torch.where(mask > 0, x * mask, torch.zeros_like(x))


def stream_blockers(train_cfg: TrainConfig, algo: AlgorithmConfig, max_new_tokens: int | None = None,
                    segment_mismatch_bound: float | None = None) -> list[str]:
    """Why this trainer configuration has no streamed update (empty: it has): a streamed update is
    `step`'s single pass, so anything that needs the old log-probs of the whole batch first, or a
    loss denominator known only from the batch's shape, rules it out."""
    reasons = []
    if train_cfg.ppo_epochs != 1:
        reasons.append(f"train.ppo_epochs={train_cfg.ppo_epochs}: several passes need the whole batch")
    if algo.mismatch_ratio_bounds is not None:
        reasons.append("algorithm.mismatch_ratio_bounds: the mismatch filter needs the old log-probs up front")
    if segment_mismatch_bound is not None:
        reasons.append("a segment mismatch bound needs the old log-probs up front")
    if algo.loss_agg == "seq-mean-token-sum-norm" and max_new_tokens is None and algo.loss_agg_norm_length is None:
        reasons.append("loss_agg seq-mean-token-sum-norm without max_new_tokens or algorithm.loss_agg_norm_length "
                       "normalizes by the batch's width")
    return reasons


@dataclass
class _Stream:
    """A streamed update in progress: its metric sums and the counts its loss denominators need."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    rows: int = 0
    tokens: float = 0.0  # valid tokens
    seqs: float = 0.0  # N, counted per algorithm.loss_agg_seq_count
    valid: float = 0.0  # rows with a non-zero advantage on a valid token (GPG's B - M)


class PolicyTrainer:
    """Owns the optimizer and LR schedule of one policy; computes and applies the RL update."""

    def __init__(
        self,
        model: PreTrainedModel,
        train_cfg: TrainConfig,
        algo_cfg: AlgorithmConfig,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        ref_model: PreTrainedModel | None = None,
        segment_ratio: bool = False,
        segment_mismatch_bound: float | None = None,
        ref_context: Callable[[], ContextManager] = nullcontext,
        parallel: DataParallel | None = None,
    ):
        """`segment_ratio`: every token of a chunk (batch.segments) sees the chunk's geometric-mean
        ratio (IPA); `segment_mismatch_bound`: drop chunks whose trainer/engine ratio leaves [0, bound].
        `ref_context`: the context the reference forward runs in (LoRA: adapters off, with `ref_model`
        the policy itself). `parallel`: this rank's data-parallel group (train/parallel.py), the model
        already sharded. Batches may live anywhere: they are moved to the model's device."""
        self.model = model
        self.ref_context = ref_context
        self.parallel = parallel
        self.device = model.get_output_embeddings().weight.device
        self.autocast = torch.bfloat16 if train_cfg.precision == "bf16" else None
        self.segment_ratio = segment_ratio
        self.segment_mismatch_bound = segment_mismatch_bound
        self.cfg = train_cfg
        self.algo = algo_cfg
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.ref_model = ref_model
        self.kl_coef = algo_cfg.kl_coef  # moved by an adaptive KL controller when one is configured
        self.version: int | None = None  # the weights version held, when the caller tracks versions
        self.loss_fn = POLICY_LOSSES[algo_cfg.loss]
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(train_cfg))
        self._stream: _Stream | None = None  # set between begin_stream and finish_stream
        self._timings: dict[str, float] = defaultdict(float)  # of the update in progress; `step` starts it afresh
        self._loss_scale = 1.0  # GPG's alpha of the batch `step` trains (algorithm.gpg_rescale)

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Log-probs [B, C] of the batch's completions under the frozen reference policy."""
        return self._reference_logprobs(batch).cpu()  # orchestration (reward-side KL) runs on the host

    def _reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """`reference_logprobs` on the model's device."""
        if self.ref_model is None:
            raise RuntimeError("no reference model: set algorithm.kl_coef > 0 or algorithm.track_kl")
        with self.ref_context():
            return self._logprobs_no_grad(self.ref_model, batch.to(self.device))

    @torch.no_grad()
    def _logprobs_no_grad(self, model: PreTrainedModel, batch: TrainBatch) -> torch.Tensor:
        return torch.cat([completion_logprobs(model, mb, self.temperature, autocast=self.autocast)[0]
                          for _, mb in batch.micro_batches(self.cfg.micro_batch_size)])

    def step(self, batch: TrainBatch, ref_logp: torch.Tensor | None = None) -> dict[str, float]:
        """One RL update on a rollout batch; returns scalar metrics averaged over valid tokens.

        `ref_logp` reuses reference log-probs the caller already computed (reward-side KL). Under data
        parallelism every rank is given the same whole batch and trains its own rows of it."""
        batch = batch.to(self.device)
        ref_logp = None if ref_logp is None else ref_logp.to(self.device)
        mini = self.cfg.mini_batch_size or batch.size
        # rows of the whole batch and of its mini-batches, before sharding pads ranks with loss-free rows
        size, global_mini = batch.size, mini
        if self.parallel is not None:
            batch, index, mini = self.parallel.shard(batch, mini)
            ref_logp = None if ref_logp is None else ref_logp[index]
        by_segment = self.segment_mismatch_bound is not None and batch.segments is not None
        # Filters that drop tokens before the update need the old log-probs up front; truncated IS
        # weights do not: they are computed per micro-batch from the old log-probs at hand.
        filters_mismatch = self.algo.mismatch_ratio_bounds is not None or by_segment
        single_pass = self.cfg.ppo_epochs == 1 and mini >= batch.size and not filters_mismatch
        self._timings = defaultdict(float)
        t0 = time.perf_counter()
        # With a single pass the detached current log-probs ARE the recomputed old ones: skip a forward.
        old_logp = None if single_pass else self._logprobs_no_grad(self.model, batch)
        t1 = time.perf_counter()
        if ref_logp is None and self.ref_model is not None:
            ref_logp = self._reference_logprobs(batch)
        self._timings["time/old_logprobs_s"] = t1 - t0
        self._timings["time/ref_logprobs_s"] = time.perf_counter() - t1
        if self.algo.mismatch_ratio_bounds is not None or by_segment:
            if by_segment:
                kept = segment_mismatch_mask(old_logp, batch.behaviour_logprobs, batch.segments, batch.mask,
                                             upper=self.segment_mismatch_bound)
            else:
                kept = mismatch_mask(old_logp, batch.behaviour_logprobs, batch.mask, self.algo.tis_level,
                                     ratio_bounds=self.algo.mismatch_ratio_bounds)
            dropped = self._global(float(batch.mask.sum() - kept.sum()))
            batch = batch.select(slice(None))  # a new batch object: the caller's mask stays as it was
            batch.mask = kept
        if self.algo.gpg_rescale:  # over every rank's rows, after the mismatch filter has dropped its tokens
            self._loss_scale = self._gpg_alpha(self._global(valid_rows(batch.token_advantages, batch.mask)), size)
        sums: dict[str, float] = defaultdict(float)
        self._mismatch_max = 0.0
        if old_logp is not None:
            # train/inference consistency (same weights, trainer vs engine log-probs), counted like every
            # other metric: per token, summed over epochs
            current = self._current_version(batch.mask, batch.versions)
            gap = _masked((old_logp - batch.behaviour_logprobs).abs(), current)
            self._mismatch_max = float(gap.max())
            sums["logprob_mismatch"] = float(gap.sum()) * self.cfg.ppo_epochs
            sums["mismatch_tokens"] = float(current.sum()) * self.cfg.ppo_epochs
        grad_norms = []
        self.model.train()
        for _ in range(self.cfg.ppo_epochs):
            for k, start in enumerate(range(0, batch.size, mini)):  # local mini-batch k is global mini-batch k
                index = torch.arange(start, min(start + mini, batch.size))
                rows = min(global_mini, size - k * global_mini)
                grad_norms.append(self._optimizer_step(batch.select(index), index, old_logp, ref_logp, sums, rows))
        self.model.eval()
        self.scheduler.step()
        metrics = self._metrics(sums, grad_norms)
        if self.algo.mismatch_ratio_bounds is not None or by_segment:
            metrics["mismatch/dropped_tokens"] = dropped
        return metrics

    def begin_stream(self) -> None:
        """Start a streamed update: the same single-pass update as `step`, its batch given in chunks
        (`add`) and applied by `finish_stream`. Raises ValueError if this configuration has no such form."""
        reasons = stream_blockers(self.cfg, self.algo, self.max_new_tokens, self.segment_mismatch_bound)
        if self.parallel is not None:
            reasons.append("data-parallel ranks train their shares of a whole batch")
        if reasons:
            raise ValueError("this update cannot be streamed: " + "; ".join(reasons))
        self.optimizer.zero_grad(set_to_none=True)
        # a single pass needs no old log-prob forward: its key is kept so both forms report the same metrics
        self._timings = defaultdict(float, {"time/old_logprobs_s": 0.0, "time/ref_logprobs_s": 0.0})
        self._mismatch_max = 0.0
        self._stream = _Stream()

    def add(self, batch: TrainBatch) -> None:
        """Forward/backward on one chunk of a streamed update (its advantages already set).

        The loss denominators (valid tokens, sequences) are those of the whole batch, unknown until
        `finish_stream`; the loss is linear in them, so each chunk's loss is aggregated with
        denominators 1 here and the summed gradients are scaled once at the end."""
        s = self._stream
        if s is None:
            raise RuntimeError("add() outside a streamed update: call begin_stream() first")
        batch = batch.to(self.device)
        if self.cfg.mini_batch_size is not None and s.rows + batch.size > self.cfg.mini_batch_size:
            raise ValueError(f"{s.rows + batch.size} rows exceed train.mini_batch_size={self.cfg.mini_batch_size}: "
                             "a streamed update is one mini-batch")
        t0 = time.perf_counter()
        ref_logp = None if self.ref_model is None else self._reference_logprobs(batch)
        self._timings["time/ref_logprobs_s"] += time.perf_counter() - t0
        s.rows += batch.size
        s.tokens += float(batch.mask.sum())
        s.seqs += count_seqs(batch.mask, self.algo.loss_agg_seq_count)
        s.valid += valid_rows(batch.token_advantages, batch.mask)
        numerator = {**self._agg(1.0, 1.0), "norm_length": 1.0}
        self.model.train()
        self._accumulate(batch, torch.arange(batch.size), None, ref_logp, s.sums, numerator)
        self.model.eval()

    def finish_stream(self) -> dict[str, float]:
        """Apply the streamed update: scale the accumulated gradients by the batch's loss denominators,
        clip, optimizer and LR-schedule step. Returns `step`'s metrics; {} (and no step, as for an
        empty batch) when no rows were added."""
        s, self._stream = self._stream, None
        if s is None:
            raise RuntimeError("finish_stream() outside a streamed update: call begin_stream() first")
        if s.rows == 0:
            return {}
        # aggregate_loss of one token of loss 1 is exactly the factor it applies to a loss sum, whatever the mode;
        # GPG's alpha scales the whole loss the same way
        agg = self._agg(s.tokens, s.seqs)
        scale = float(aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), **agg)) * self._gpg_alpha(s.valid, s.rows)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        s.sums["loss"] *= scale
        grad_norm = self.apply_gradients()
        self.scheduler.step()
        return self._metrics(s.sums, [grad_norm])

    def _global(self, *values: float):
        """`values` summed over the data-parallel ranks (as they are when training alone); one value: a float."""
        out = list(values) if self.parallel is None else self.parallel.sum(list(values))
        return out[0] if len(out) == 1 else out

    def _metrics(self, sums: dict[str, float], grad_norms: list[float]) -> dict[str, float]:
        """The update's metrics from its sums: per-token means, the loss per optimizer step, timings."""
        if self.parallel is not None:
            keys = sorted(sums)  # every rank ran the same code: same keys, same order
            sums = defaultdict(float, zip(keys, self.parallel.sum([sums[k] for k in keys])))
            self._mismatch_max = self.parallel.max(self._mismatch_max)
        loss_sum = sums.pop("loss")
        tokens = max(sums.pop("tokens"), 1.0)
        mismatch, mismatch_tokens = sums.pop("logprob_mismatch", 0.0), sums.pop("mismatch_tokens", 0.0)
        metrics = {k: v / tokens for k, v in sums.items()}
        if mismatch_tokens > 0:
            metrics["logprob_mismatch"] = mismatch / mismatch_tokens
        metrics["loss"] = loss_sum / len(grad_norms)
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["logprob_mismatch_max"] = self._mismatch_max
        metrics.update(self._timings)
        return metrics

    def _current_version(self, mask: torch.Tensor, versions: torch.Tensor | None) -> torch.Tensor:
        """`mask` restricted to the tokens sampled with the weights this trainer holds (`self.version`):
        only those must match the engine's log-probs; older tokens differ by the policy's own change."""
        if self.version is None or versions is None:
            return mask
        return mask * (versions == self.version)

    def _agg(self, tokens: float, seqs: float, width: int | None = None) -> dict[str, Any]:
        """aggregate_loss's mode, options and denominators for `tokens` valid tokens and `seqs` sequences; L_norm is
        algorithm.loss_agg_norm_length, else max_new_tokens, else the batch's completion `width`."""
        return dict(mode=self.algo.loss_agg, num_tokens=tokens, num_seqs=seqs,
                    norm_length=self.algo.loss_agg_norm_length or self.max_new_tokens or width,
                    norm_by_seqs=self.algo.loss_agg_norm_by_seqs)

    def _gpg_alpha(self, valid: float, rows: float) -> float:
        """GPG's alpha for a batch with `valid` of `rows` rows carrying an advantage; 1 without gpg_rescale."""
        return gpg_alpha(valid, rows, self.algo.gpg_min_valid_fraction) if self.algo.gpg_rescale else 1.0

    def _optimizer_step(self, mini: TrainBatch, index, old_logp, ref_logp, sums, rows: int) -> float:
        """One optimizer step on `mini`, this rank's share of a global mini-batch of `rows` rows."""
        tokens, nonempty = self._global(float(mini.mask.sum()), count_seqs(mini.mask))
        seqs = float(rows) if self.algo.loss_agg_seq_count == "all" else nonempty  # padding rows are no sequences
        agg = self._agg(tokens, seqs, mini.completion_width)
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulate(mini, index, old_logp, ref_logp, sums, agg, self._loss_scale)
        return self.apply_gradients()

    def _accumulate(self, mini: TrainBatch, index, old_logp, ref_logp, sums, agg: dict,
                    loss_scale: float = 1.0) -> None:
        """Forward/backward over the micro-batches of `mini`, adding to the gradients and to `sums`.

        `agg` holds aggregate_loss's mode and denominators; `index` maps rows of `mini` into `old_logp`
        and `ref_logp` (None: a single pass, where the detached current log-probs are the old ones).
        `loss_scale` multiplies the whole loss, KL term included (GPG's alpha, as in the authors' code)."""
        t0 = time.perf_counter()
        for sl, micro in mini.micro_batches(self.cfg.micro_batch_size):
            logp, entropy = completion_logprobs(self.model, micro, self.temperature, with_entropy=True,
                                                autocast=self.autocast)
            old = logp.detach() if old_logp is None else old_logp[index[sl]]
            loss_logp = logp
            if self.segment_ratio and micro.segments is not None:
                loss_logp = old + segment_log_ratio(logp, old, micro.segments, micro.mask)
            params = loss_params(self.algo, behaviour_logp=micro.behaviour_logprobs)
            out = self.loss_fn(loss_logp, old, micro.token_advantages, mask=micro.mask, **params)
            token_loss = out.token_loss
            if self.algo.tis_cap is not None:
                token_loss = token_loss * tis_weights(old, micro.behaviour_logprobs, micro.mask, self.algo.tis_cap,
                                                      self.algo.tis_level)
            loss = aggregate_loss(token_loss, micro.mask, **agg)
            m = micro.mask
            if ref_logp is not None:
                kl = kl_estimate(self.algo.kl_estimator, logp, ref_logp[index[sl]], m, self.algo.kl_clamp)
                if self.kl_coef > 0 and self.algo.kl_placement == "loss":
                    term = importance_weighted_kl(kl, logp, old, m) if self.algo.kl_ratio_weighted else kl
                    loss = loss + self.kl_coef * aggregate_loss(term, m, **agg)
                sums["kl"] += float(kl.detach().sum())  # 0 off the mask
            loss = loss * loss_scale
            loss.backward()
            sums["loss"] += float(loss.detach())  # micro losses add up to the mini-batch loss
            self._add_metrics(sums, micro, logp.detach(), old, entropy, out, single_pass=old_logp is None)
        self._timings["time/forward_backward_s"] += time.perf_counter() - t0

    @torch.no_grad()
    def _add_metrics(self, sums, micro: TrainBatch, logp, old, entropy, out: PolicyLossOutput,
                     single_pass: bool) -> None:
        """Add one micro-batch's token sums to `sums`; padding never enters them, whatever its log-probs."""
        m = micro.mask
        log_ratio = masked_log_ratio(logp, old, m)
        sums["entropy"] += float(_masked(entropy, m).sum())
        sums["clip_fraction"] += float(_masked(out.clipped.to(m.dtype), m).sum())
        sums["approx_kl"] += float(_masked(log_ratio.exp() - 1 - log_ratio, m).sum())
        sums["ratio"] += float(_masked(out.ratio.detach(), m).sum())
        if single_pass:  # logp is still the pre-update policy
            current = self._current_version(m, micro.versions)
            gap = _masked((logp - micro.behaviour_logprobs).abs(), current)
            sums["logprob_mismatch"] += float(gap.sum())
            sums["mismatch_tokens"] += float(current.sum())
            self._mismatch_max = max(self._mismatch_max, float(gap.max()))
        sums["tokens"] += float(m.sum())

    def apply_gradients(self) -> float:
        """Clip the accumulated gradients and take the optimizer step; returns the norm before clipping."""
        t0 = time.perf_counter()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self._timings["time/optimizer_s"] += time.perf_counter() - t0
        return local_value(grad_norm)
