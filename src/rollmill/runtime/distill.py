"""The distillation job (`pipeline: distill`, docs/distill.md): a teacher model taught to the policy, driven
by the shared run loop.

Each step takes `rollout.prompts_per_step` training prompts (with `task.mix`, each prompt's domain drawn by
the current DDK weights) and `rollout.group_size` replies to each: the teacher's (`forward_kl`, `sft`;
sampled once per prompt at `distill.teacher_temperature` and kept), or the student's own, sampled by a
rollout worker as RL samples (`reverse_kl`). Both models read every reply, and one AdamW step is taken
on the mode's per-token loss (`rollmill.algos.distill`) averaged over the step's reply tokens.

Every `distill.ddk_every` steps the forward KL to the teacher on each domain's held-out teacher replies
is measured and the domain weights move toward the larger gaps (`ddk_update`). Evals report task
accuracy (the RLVR eval, per domain with `task.mix`) and the held-out loss and KL to the teacher.
Checkpoints add the prompt cursors, the DDK weights and the teacher's replies, so resume is exact.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rollmill.algos.distill import ddk_update, token_kl, topk_forward_kl
from rollmill.config import AlgorithmConfig, ConfigError, DistillConfig, RunConfig
from rollmill.distill import TeacherReplies, check_teacher, domain_of, generate, reply_example, reply_logits
from rollmill.models import load_model, load_tokenizer
from rollmill.models.device import resolve_device
from rollmill.pipelines.common import encode_prompt
from rollmill.pipelines.rlvr import PromptSource
from rollmill.runtime.learner import Learner
from rollmill.runtime.loop import check_finite_loss, resume_newest
from rollmill.runtime.task_eval import TaskEval
from rollmill.runtime.worker import RolloutWorker
from rollmill.sft import Tokenized, packed_batches
from rollmill.tasks import Example
from rollmill.track import read_jsonl
from rollmill.types import GroupSpec

log = logging.getLogger(__name__)

REPLIES_FILE = "teacher_replies.json"


def rlvr_view(cfg: RunConfig) -> RunConfig:
    """`cfg` as the RLVR pieces distillation reuses see it (learner, prompt source, student worker): pipeline
    rlvr and the default algorithm, so the learner builds no reference model or critic."""
    return cfg.model_copy(update={"pipeline": "rlvr", "algorithm": AlgorithmConfig(), "distill": DistillConfig()})


def teacher_view(cfg: RunConfig) -> RunConfig:
    """`rlvr_view` with the teacher as the model, sampling at `distill.teacher_temperature`: the config of the
    rollout worker that writes the teacher's replies."""
    sampling = cfg.rollout.sampling.model_copy(update={"temperature": cfg.distill.teacher_temperature})
    return rlvr_view(cfg).model_copy(update={"model": cfg.distill.teacher,
                                             "rollout": cfg.rollout.model_copy(update={"sampling": sampling})})


def plot_ddk_weights(run_dir: Path) -> Path | None:
    """Draw the DDK domain weights of `run_dir`'s metrics.jsonl against step into RUN_DIR/ddk_weights.png
    (None when the run logged none)."""
    from matplotlib.figure import Figure  # a bare Figure: no display backend, nothing left in pyplot

    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if any(k.startswith("ddk/weight/") for k in r)]
    if not records:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key in sorted({k for r in records for k in r if k.startswith("ddk/weight/")}):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), drawstyle="steps-post", label=key.removeprefix("ddk/weight/"))
    ax.set(title="DDK domain weights", xlabel="step", ylabel="sampling weight", ylim=(0, 1))
    ax.legend()
    out = run_dir / "ddk_weights.png"
    fig.savefig(out, dpi=100)
    return out


class DistillJob:
    """One distillation run, stepped by `runtime.loop.run_job`."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir, self.d = cfg, run_dir, cfg.distill
        self.headline = "eval/accuracy"
        self.tokenizer = load_tokenizer(cfg.model)
        check_teacher(cfg, self.tokenizer)  # before any model loads
        self.rl = rlvr_view(cfg)
        self.source = PromptSource(self.rl)
        self.domains = [item.mix_label for item in cfg.task.mix]
        total = sum(self.source.weights)
        self.source.weights = [w / total for w in self.source.weights]  # DDK moves them; they sum to 1
        self.learner = Learner(self.rl)
        self.teacher = load_model(cfg.distill.teacher)[0].requires_grad_(False)
        self.teacher.to(resolve_device(cfg.distill.teacher.device, "distill.teacher.device"))
        student_vocab, teacher_vocab = (m.get_output_embeddings().weight.shape[0]
                                        for m in (self.learner.model, self.teacher))
        if student_vocab != teacher_vocab:
            raise ConfigError(f"distill.teacher: its output layer has {teacher_vocab} rows and the student's "
                              f"{student_vocab}; the two distributions must be over the same tokens")
        # the student's worker: its samples (reverse_kl) and held-out accuracy
        self.task_eval = TaskEval(self.rl, self.source, self.tokenizer, RolloutWorker(self.rl))
        self.teacher_worker = RolloutWorker(teacher_view(cfg))
        self.replies = TeacherReplies()
        self.step = 0
        self._held_out_at: tuple[int, dict] | None = None  # (step, measurement): evals and DDK share one
        self._dumps: list[dict] = []

    # -- data -------------------------------------------------------------------------------------
    def _prompt(self, example: Example) -> list[int]:
        return encode_prompt(self.tokenizer, example, self.rl.task)

    def _teacher_replies(self, split: str, items: list[tuple[int, Example]], count: int) -> int:
        """Make sure the teacher's `count` replies to each (index, example) of `split` are kept; returns how
        many it wrote now. Seeds follow the prompt (not the step), so a reply does not depend on when it
        was first needed."""
        offset = 0 if split == "train" else len(self.source.train)
        missing = {i: e for i, e in items if not self.replies.has(split, i)}
        if not missing:
            return 0
        specs = [GroupSpec(offset + i, i, e, tuple(range(count))) for i, e in missing.items()]
        for traj in generate(self.teacher_worker, specs):
            self.replies.add(split, traj.prompt_id, traj.rows[0].token_ids, traj.success)
        return len(specs) * count

    def _student_samples(self, specs: list[GroupSpec]) -> list[Tokenized]:
        self.task_eval.publish(self.learner, self.step)
        return [reply_example(t.rows[0].prompt_ids, t.rows[0].token_ids)
                for t in generate(self.task_eval.worker, specs)]

    def _batches(self, examples: list[Tokenized]):
        limit = self.d.max_seq_len
        kept = [e.cut(limit) for e in examples]
        kept = [e for e in kept if e.trained]
        if not kept:
            raise ConfigError(f"distill.max_seq_len = {limit}: no reply token fits after its prompt; raise it")
        return packed_batches(kept, limit, True, self.cfg.train.micro_batch_size, self.learner.pad_id)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict, list[dict]]:
        """One AdamW step on the mode's loss over this step's replies; returns its metrics (with the DDK
        weights, and their gaps on a DDK step) and no samples unless it evaluates."""
        start = time.perf_counter()
        torch.set_num_threads(self.learner.threads)
        record: dict = {}
        if self.d.ddk_every and self.step % self.d.ddk_every == 0:
            record.update(self._ddk_update())
            record["time/ddk_s"] = time.perf_counter() - start
        t0 = time.perf_counter()
        group = self.cfg.rollout.group_size
        specs = self.source.next_groups(self.cfg.rollout.prompts_per_step, group)
        if self.d.mode == "reverse_kl":
            examples = self._student_samples(specs)
        else:
            record["distill/teacher_replies_new"] = self._teacher_replies(
                "train", [(s.prompt_id, s.payload) for s in specs], group)
            examples = [reply_example(self._prompt(s.payload), ids) for s in specs
                        for ids in self.replies.get("train", s.prompt_id)]
        t1 = time.perf_counter()
        record.update(self._update(examples))
        self.step += 1
        self.learner.version = self.step
        for label in self.domains:
            record[f"distill/prompts/{label}"] = sum(domain_of(s.payload) == label for s in specs)
        record.update({f"ddk/weight/{label}": w for label, w in zip(self.domains, self.source.weights)})
        record.update({"step": self.step, "time/step_s": time.perf_counter() - start, "time/generate_s": t1 - t0,
                       "time/update_s": time.perf_counter() - t1})
        self._dumps = []
        return record, self._dumps

    def _update(self, examples: list[Tokenized]) -> dict:
        trainer, model = self.learner.trainer, self.learner.model
        batches = self._batches(examples)
        total = sum(b.tokens for b in batches)  # reply tokens within distill.max_seq_len
        trainer.optimizer.zero_grad(set_to_none=True)
        model.train()
        loss_sum = 0.0
        for batch in batches:
            loss = self._token_losses(batch)
            (loss.sum() / total).backward()
            loss_sum += float(loss.detach().sum())
        model.eval()
        lr = trainer.scheduler.get_last_lr()[0]  # the rate this step's update uses
        grad_norm = trainer.apply_gradients()
        trainer.scheduler.step()
        return {"loss": loss_sum / total, "tokens": total, "grad_norm": grad_norm, "lr": lr,
                "response_length/mean": sum(sum(e.mask) for e in examples) / len(examples)}

    def _token_losses(self, batch) -> torch.Tensor:
        """The mode's loss at each reply token of `batch` (with the student's gradient)."""
        autocast = self.learner.trainer.autocast
        student, labels = reply_logits(self.learner.model, batch, autocast)
        if self.d.mode == "sft":
            return F.cross_entropy(student, labels, reduction="none")
        with torch.no_grad():
            teacher = reply_logits(self.teacher, batch, autocast)[0].to(student.device)
        if self.d.mode == "forward_kl":
            return topk_forward_kl(teacher, student, self.d.top_k)
        return token_kl(student, teacher)

    # -- held-out measurements and DDK ------------------------------------------------------------
    @torch.no_grad()
    def _held_out(self) -> dict[str | None, dict]:
        """Per domain (None: all of them), on the held-out prompts' teacher replies: the student's and the
        teacher's loss per reply token and the exact forward KL(teacher || student) per token."""
        if self._held_out_at is not None and self._held_out_at[0] == self.step:
            return self._held_out_at[1]
        held_out = self.source.eval
        self._teacher_replies("eval", list(enumerate(held_out)), 1)
        sums: dict[str | None, torch.Tensor] = {}
        for label in self.domains or [None]:
            examples = [reply_example(self._prompt(e), ids) for i, e in enumerate(held_out)
                        if domain_of(e) == label for ids in self.replies.get("eval", i)]
            sums[label] = sum(self._held_out_sums(batch) for batch in self._batches(examples))
        if self.domains:
            sums[None] = sum(sums.values())
        out = {label: {"loss": s[0] / s[3], "teacher_loss": s[1] / s[3], "kl": s[2] / s[3]}
               for label, s in ((k, v.tolist()) for k, v in sums.items())}
        self._held_out_at = (self.step, out)
        return out

    def _held_out_sums(self, batch) -> torch.Tensor:
        """[student NLL, teacher NLL, KL(teacher || student), tokens], summed over `batch`'s reply tokens."""
        autocast = self.learner.trainer.autocast
        student, labels = reply_logits(self.learner.model, batch, autocast)
        teacher = reply_logits(self.teacher, batch, autocast)[0].to(student.device)
        return torch.stack([F.cross_entropy(student, labels, reduction="sum"),
                            F.cross_entropy(teacher, labels, reduction="sum"),
                            token_kl(teacher, student).sum(), torch.tensor(float(len(labels)))]).cpu()

    def _ddk_update(self) -> dict:
        """Measure each domain's gap and move the sampling weights toward the larger ones."""
        held = self._held_out()
        gaps = torch.tensor([held[label]["kl"] for label in self.domains], dtype=torch.float64)
        weights = ddk_update(torch.tensor(self.source.weights, dtype=torch.float64), gaps, self.d.ddk_alpha)
        self.source.weights = weights.tolist()
        return {f"ddk/gap/{label}": float(g) for label, g in zip(self.domains, gaps)}

    # -- evaluation, health, checkpoints ----------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out task accuracy of the student (replies at `eval.temperature`, scored by reward.functions),
        and its loss and KL to the teacher on the teacher's held-out replies; per domain with `task.mix`."""
        held = self._held_out()
        metrics = {f"eval/{key}": value for key, value in held[None].items()}
        for label in self.domains:
            metrics.update({f"eval/{key}/{label}": held[label][key] for key in ("loss", "kl")})
        metrics["eval/teacher_accuracy"] = self.replies.accuracy("eval")
        metrics.update(self.task_eval.metrics(self.learner, self.step, self._dumps))
        return metrics

    def check_health(self, record: dict) -> None:
        check_finite_loss(record, "distillation", "lower train.lr, or train in float32 (train.precision fp32, "
                          "model.dtype float32)")

    def save(self, extra: dict) -> Path:
        state = {**extra, "source": self.source.state(), "ddk_weights": self.source.weights}
        files = {REPLIES_FILE: self.replies.to_json().encode()}
        return self.learner.save(self.run_dir / "checkpoints", self.step, state, self.cfg.checkpoint.keep, files)

    def resume(self) -> dict | None:
        """Restore the newest readable checkpoint: weights, optimizer, cursors, DDK weights, teacher replies."""
        found = resume_newest(self.run_dir, self.learner.load)
        if found is None:
            return None
        ckpt, state = found
        self.step = state["step"]
        self.source.load_state(state["source"])
        self.source.weights = state["ddk_weights"]
        self.replies = TeacherReplies.from_json((ckpt / REPLIES_FILE).read_text())
        return state

    def close(self) -> None:
        self.task_eval.close()
        self.teacher_worker.close()
        if self.domains:
            plot_ddk_weights(self.run_dir)
