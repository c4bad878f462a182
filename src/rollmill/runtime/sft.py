"""The SFT job (`pipeline: sft`): supervised fine-tuning on demonstrations, driven by the shared run loop.

Each step takes the next `sft.examples_per_step` examples from a seeded cursor (saved in checkpoints,
so a resumed run sees the same order), packs them into rows (`rollmill.sft.packing`) and takes one
AdamW step on the mean negative log-likelihood of their assistant tokens (`rollmill.sft.masks`).

The pieces RL runs have are reused as they are: the learner role holds the policy, its optimizer, LR
schedule (`train.*`) and checkpoints (HF-loadable folders, LoRA included), and held-out task accuracy
is the RLVR eval (replies at `eval.temperature`, greedy by default, on a rollout worker, scored by
`reward.functions`) with the current weights. Besides that, each eval reports the held-out loss (`eval/loss`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from rollmill.config import AlgorithmConfig, ConfigError, RunConfig, SFTConfig
from rollmill.models import load_tokenizer
from rollmill.pipelines.common import PromptCursor
from rollmill.pipelines.rlvr import PromptSource
from rollmill.runtime.learner import Learner
from rollmill.runtime.cursor_job import CursorJob
from rollmill.runtime.loop import check_finite_loss
from rollmill.runtime.task_eval import TaskEval
from rollmill.runtime.worker import RolloutWorker
from rollmill.sft import Tokenized, load_chat, packed_batches, task_conversation, token_nll, tokenize_conversation

log = logging.getLogger(__name__)


def rlvr_view(cfg: RunConfig) -> RunConfig:
    """`cfg` as the RLVR pieces SFT reuses see it (the learner, the prompt source, the eval worker): pipeline
    rlvr, and the default algorithm, so the learner builds no reference model or critic SFT has no use for."""
    return cfg.model_copy(update={"pipeline": "rlvr", "algorithm": AlgorithmConfig(), "sft": SFTConfig()})


def reads_task(cfg: RunConfig) -> bool:
    """Whether an SFT run reads `task:`: its rows as demonstrations, or its held-out split for accuracy."""
    return cfg.sft.path is None or cfg.sft.measures_accuracy


class SFTJob(CursorJob):
    """One SFT run, stepped by `runtime.loop.run_job`."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.headline = "eval/accuracy" if cfg.sft.measures_accuracy else "eval/loss"
        self.tokenizer = load_tokenizer(cfg.model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("pipeline 'sft' takes its loss masks from the chat template, and this model's "
                              "tokenizer has none: use a chat model (model.source / model.path)")
        rl = rlvr_view(cfg)
        self.source = PromptSource(rl) if reads_task(cfg) else None  # bad data fails before any model loads
        self.train_set, self.eval_set = self._data()
        self.cursor = PromptCursor(len(self.train_set), seed=cfg.task.seed + cfg.train.seed)
        self.learner = Learner(rl)
        self.task_eval = TaskEval(rl, self.source, self.tokenizer, RolloutWorker(rl)) if cfg.sft.measures_accuracy else None
        self.step = 0
        self._dumps: list[dict] = []

    def _data(self) -> tuple[list[Tokenized], list[Tokenized]]:
        """The training and held-out examples, tokenized with their masks and cut to `sft.max_seq_len`."""
        if self.cfg.sft.path is not None:
            train, held_out = load_chat(self.cfg)
        else:
            train = [task_conversation(e, self.cfg) for e in self.source.train]
            held_out = [task_conversation(e, self.cfg) for e in self.source.eval]
        return self._tokenized(train, "training"), self._tokenized(held_out, "held-out")

    def _tokenized(self, conversations, split: str) -> list[Tokenized]:
        limit = self.cfg.sft.max_seq_len
        full = [Tokenized(*map(tuple, tokenize_conversation(self.tokenizer, c))) for c in conversations]
        cut = [e.cut(limit) for e in full]
        kept = [e for e in cut if e.trained]
        if long := sum(len(e.ids) > limit for e in full):
            log.warning("%d of %d %s examples are longer than sft.max_seq_len=%d tokens and are cut there",
                        long, len(full), split, limit)
        if len(kept) < len(cut):
            log.warning("%d %s examples have no assistant token within sft.max_seq_len=%d and are left out",
                        len(cut) - len(kept), split, limit)
        if not kept:
            raise ConfigError(f"sft.max_seq_len = {limit}: no {split} example has an assistant token within it; "
                              "raise it")
        return kept

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict, list[dict]]:
        """One AdamW step on the next `sft.examples_per_step` examples; returns its metrics and the held-out
        replies `evaluate` adds on an eval step (the loop logs a step's samples after its eval)."""
        t0 = time.perf_counter()
        torch.set_num_threads(self.learner.threads)
        sft, trainer = self.cfg.sft, self.learner.trainer
        examples = [self.train_set[i] for i in self.cursor.take(sft.examples_per_step)]
        total = sum(e.trained for e in examples)
        batches = self._batches(examples)
        model = self.learner.model
        trainer.optimizer.zero_grad(set_to_none=True)
        model.train()
        nll_sum = 0.0
        for batch in batches:
            nll = token_nll(model, batch, trainer.autocast)
            (nll.sum() / total).backward()
            nll_sum += float(nll.detach().sum())
        model.eval()
        t1 = time.perf_counter()
        lr = trainer.scheduler.get_last_lr()[0]  # the rate this step's update uses
        grad_norm = trainer.apply_gradients()
        trainer.scheduler.step()
        self.step += 1
        self.learner.version = self.step
        rows = sum(b.input_ids.shape[0] for b in batches)
        seen = sum(len(e.ids) for e in examples)  # every token runs through the model, trained or not
        seconds = time.perf_counter() - t0
        record = {"step": self.step, "loss": nll_sum / total, "tokens": total, "grad_norm": grad_norm, "lr": lr,
                  "sft/examples": len(examples), "sft/rows": rows, "sft/fill": seen / (rows * sft.max_seq_len),
                  "sft/epoch": self.cursor.epoch + self.cursor.position / self.cursor.size,
                  "time/step_s": seconds, "time/forward_backward_s": t1 - t0,
                  "time/optimizer_s": time.perf_counter() - t1, "throughput/tokens_per_s": seen / seconds}
        self._dumps = []
        return record, self._dumps

    def _batches(self, examples: list[Tokenized]):
        sft = self.cfg.sft
        return packed_batches(examples, sft.max_seq_len, sft.pack, self.cfg.train.micro_batch_size,
                              self.learner.pad_id)

    # -- evaluation, health, checkpoints ----------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out loss per assistant token, and with `sft.task_accuracy` the RLVR held-out metrics
        (eval/accuracy, eval/pass@k, ...) of replies sampled at `eval.temperature` (0: greedy) with the
        current weights."""
        metrics = {"eval/loss": self._held_out_loss()}
        if self.task_eval is not None:
            metrics.update(self.task_eval.metrics(self.learner, self.step, self._dumps))
        return metrics

    @torch.no_grad()
    def _held_out_loss(self) -> float:
        nll = [token_nll(self.learner.model, b, self.learner.trainer.autocast) for b in self._batches(self.eval_set)]
        return float(torch.cat(nll).mean())

    def check_health(self, record: dict) -> None:
        check_finite_loss(record, "SFT", "lower train.lr, or train in float32 (train.precision fp32, model.dtype float32)")
