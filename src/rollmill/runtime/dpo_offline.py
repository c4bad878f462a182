"""DPO on a preference file (`pipeline: dpo` with `dpo.path`), driven by the shared run loop.

Each step takes the next `dpo.pairs_per_step` (prompt, chosen, rejected) pairs from a seeded cursor
(saved in checkpoints, so a resumed run sees the same order) and takes `dpo.epochs_per_step` DPO steps
on them (`train.preference.preference_update`). Nothing is sampled.

The reference (the initial policy; LoRA: the base with its adapters off) never changes, so its
log-probs of every training and held-out reply are computed once, before the first step, by the
policy itself, and cached in the run directory (`reference_logps.safetensors`) under a fingerprint of
the initial weights, the model settings and every pair's tokens: a resumed run reads them back, a
changed data file or model computes them again. No second copy of the model is ever held.

Loss masks come from the chat template (`rollmill.sft.masks`): the prompt is rendered with the
generation prompt, and the reply's tokens are those the template's assistant turn adds (its text and
the end-of-turn token). Each eval reports held-out preference accuracy and reward margin, and with
`dpo.task_accuracy` the RLVR held-out task metrics, as the SFT job does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rollmill.config import AlgorithmConfig, ConfigError, DPOConfig, RunConfig, TaskConfig
from rollmill.models import load_tokenizer
from rollmill.pipelines.common import PromptCursor
from rollmill.pipelines.rlvr import PromptSource
from rollmill.runtime.learner import Learner
from rollmill.runtime.cursor_job import CursorJob
from rollmill.runtime.loop import check_finite_loss
from rollmill.runtime.task_eval import TaskEval
from rollmill.runtime.worker import RolloutWorker
from rollmill.sft import prompt_chat, tokenize_conversation
from rollmill.sft.data import read_records, with_system
from rollmill.tasks import DataError, Example
from rollmill.tasks.files import ROLES, Row as FileRow, split_rows
from rollmill.track.metrics import REFERENCE_CACHE
from rollmill.train.preference import pair_batch, preference_metrics, preference_update, reply_logps
from rollmill.types import Row

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when what the cache holds, or how it is computed, changes
Pair = tuple[Row, Row]  # (chosen, rejected): the same prompt ids, each reply its own tokens and mask


# -- the preference file ----------------------------------------------------------------------------
def read_preferences(path_text: str, key: str) -> list[FileRow]:
    """Every pair of a .jsonl or .json preference file, checked; errors name `key`, the file and the row.
    A row's `prompt` is its prompt as JSON, so pairs of one prompt are never both trained and held out;
    `messages` is the prompt chat, `columns` holds the chosen and rejected assistant messages."""
    rows = []
    for index, (where, record) in enumerate(read_records(path_text, key)):
        at = f"{Path(path_text)}: {where}"
        if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= record.keys():
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{at}: a preference row needs the fields 'prompt', 'chosen' and 'rejected' (got {fields})")
        prompt = _prompt(record["prompt"], at)
        replies = {side: _reply(record[side], f"{at}: field {side!r}") for side in ("chosen", "rejected")}
        rows.append(FileRow(index, where, json.dumps(prompt, sort_keys=True), "", prompt, replies))
    if not rows:
        raise DataError(f"{key} = {path_text!r}: has no preference pairs")
    return rows


def _prompt(value: object, at: str) -> tuple[dict, ...]:
    """A prompt: non-empty text (one user message) or a list of {role, content} messages."""
    if isinstance(value, str) and value.strip():
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}: field 'prompt' must be non-empty text or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{at}: field 'prompt': message {i} must be {{'role': one of {list(ROLES)}, "
                            f"'content': text}}, got {m!r}")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _reply(value: object, at: str) -> dict:
    """A reply: text, an assistant message, or a list holding one (TRL's conversational form)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    if not isinstance(value, str):
        raise DataError(f"{at}: a reply must be text, an assistant message {{'role': 'assistant', 'content': text}} "
                        f"or a list holding one, got {value!r}")
    if not value.strip():
        raise DataError(f"{at}: the reply is empty")
    return {"role": "assistant", "content": value}


def load_preferences(cfg: RunConfig) -> tuple[list[FileRow], list[FileRow]]:
    """(train, held-out) pairs: held-out is all of `dpo.eval_path`, else `task.eval_size` rows of `dpo.path`
    held out (seeded by `task.seed`); train keeps at most `task.train_size`."""
    dpo = cfg.dpo
    rows = read_preferences(dpo.path, "dpo.path")
    eval_rows = read_preferences(dpo.eval_path, "dpo.eval_path") if dpo.eval_path else None
    return split_rows(rows, eval_rows, cfg.task, dpo.path, "dpo.eval_path")


def without_questions(rows: list[FileRow], questions: list[Example], task: TaskConfig) -> list[FileRow]:
    """`rows` less those whose prompt is one of `questions` as the engine is asked it (`task.system_prompt`
    added to both), with a warning: task accuracy on held-out questions the run trained on would flatter it."""
    asked = {json.dumps(prompt_chat(e, task), sort_keys=True) for e in questions}
    kept = [r for r in rows if json.dumps(with_system(r.messages, task.system_prompt), sort_keys=True) not in asked]
    if len(kept) < len(rows):
        log.warning("%d training pairs ask one of the task's held-out questions and are left out",
                    len(rows) - len(kept))
    return kept


def reply_row(tokenizer, prompt: tuple[dict, ...], reply: dict, max_len: int) -> Row | None:
    """The prompt's ids (rendered with the generation prompt), then the reply's: the tokens the template's
    assistant turn adds, end-of-turn token included, all trained. Cut to `max_len` tokens in all; None
    when no reply token is left."""
    ids, mask = tokenize_conversation(tokenizer, [*prompt, reply])
    end = max(i for i, m in enumerate(mask) if m) + 1  # the last trained run is the reply (earlier ones: the prompt's)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    end = min(end, max_len)
    if end <= start:
        return None
    n = end - start
    return Row(ids[:start], ids[start:end], [1] * n, [0.0] * n, [0] * n, [0] * n)


def tokenize_pairs(tokenizer, rows: list[FileRow], cfg: RunConfig, split: str) -> list[Pair]:
    """`rows` as token rows, each prompt opened by `task.system_prompt` unless it has its own. Pairs whose
    chosen and rejected replies are the same text, or that leave a reply no token within `dpo.max_seq_len`,
    are left out with a warning."""
    limit, same, long, pairs = cfg.dpo.max_seq_len, 0, 0, []
    for row in rows:
        if row.columns["chosen"] == row.columns["rejected"]:
            same += 1
            continue
        prompt = with_system(row.messages, cfg.task.system_prompt)
        pair = tuple(reply_row(tokenizer, prompt, row.columns[side], limit) for side in ("chosen", "rejected"))
        if None in pair:
            long += 1
            continue
        pairs.append(pair)
    if same:
        log.warning("%d %s pairs have the same chosen and rejected reply (nothing to prefer) and are left out",
                    same, split)
    if long:
        log.warning("%d %s pairs leave a reply no token within dpo.max_seq_len=%d and are left out", long, split, limit)
    if not pairs:
        raise ConfigError(f"dpo.path: no {split} preference pair is left (see the warnings above)")
    return pairs


# -- the reference cache ----------------------------------------------------------------------------
def fingerprint(cfg: RunConfig, model: torch.nn.Module, splits: dict[str, list[Pair]]) -> str:
    """What the reference log-probs depend on: the model settings, the initial weights (a sum per base
    tensor: cheap, and changed by any other checkpoint) and every pair's tokens and masks."""
    digest = hashlib.sha256()
    settings = {"format": CACHE_FORMAT, "model": cfg.model.model_dump(mode="json", exclude={"device"}),
                "precision": cfg.train.precision}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "lora_" not in name:  # adapters are off for the reference
                digest.update(f"{name}={float(tensor.sum(dtype=torch.float64))!r};".encode())
    for split, pairs in splits.items():
        digest.update(split.encode())
        for pair in pairs:
            for row in pair:
                for ints in (row.prompt_ids, row.token_ids, row.mask):
                    digest.update(len(ints).to_bytes(8, "little") + array("q", ints).tobytes())
    return digest.hexdigest()


def read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors at `path` when they were made under fingerprint `key`; None otherwise."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != key:
            log.info("%s was computed for other data, tokenization or model: computing it again", path)
            return None
        return {name: f.get_tensor(name) for name in f.keys()}


def write_cache(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` under fingerprint `key`; renamed into place, so a kill never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"fingerprint": key})
    tmp.replace(path)


def score_reference(learner: Learner, splits: dict[str, list[Pair]]) -> dict[str, torch.Tensor]:
    """Each split's reply log-prob sums ([2P], `pair_batch` order) under the reference: the learner's policy
    before its first update, its adapters off under LoRA."""
    off = learner.adapters.disable_adapter if learner.adapters is not None else nullcontext
    trainer = learner.trainer
    with off():
        return {split: reply_logps(learner.model, pairs, learner.pad_id, learner.cfg.train.micro_batch_size,
                                   trainer.temperature, trainer.autocast) for split, pairs in splits.items()}


def dpo_view(cfg: RunConfig) -> RunConfig:
    """`cfg` as the RLVR pieces this job reuses see it (the learner, the prompt source, the eval worker):
    pipeline rlvr and the default algorithm, so the learner builds no reference copy or critic."""
    return cfg.model_copy(update={"pipeline": "rlvr", "algorithm": AlgorithmConfig(), "dpo": DPOConfig()})


class DPOJob(CursorJob):
    """One offline DPO run, stepped by `runtime.loop.run_job`."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.headline = "eval/accuracy" if cfg.dpo.task_accuracy else "eval/preference_accuracy"
        self.tokenizer = load_tokenizer(cfg.model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("dpo.path takes its loss masks from the chat template, and this model's tokenizer "
                              "has none: use a chat model (model.source / model.path)")
        view = dpo_view(cfg)
        self.source = PromptSource(view) if cfg.dpo.task_accuracy else None  # bad data fails before any model loads
        self.train_set, self.eval_set = self._data()
        self.cursor = PromptCursor(len(self.train_set), seed=cfg.task.seed + cfg.train.seed)
        self.learner = Learner(view)
        self.learner.trainer.temperature = 1.0  # nothing is sampled: the model's own distribution, unscaled
        self.ref = self._reference()
        self.eval_counts = torch.tensor([float(sum(row.mask)) for pair in self.eval_set for row in pair])
        self.task_eval = TaskEval(view, self.source, self.tokenizer, RolloutWorker(view)) if cfg.dpo.task_accuracy else None
        self.step = 0
        self._dumps: list[dict] = []

    def _data(self) -> tuple[list[Pair], list[Pair]]:
        """The training and held-out pairs, tokenized; with `dpo.task_accuracy` none of the training pairs
        asks one of the task's held-out questions."""
        train, held_out = load_preferences(self.cfg)
        if self.source is not None:
            train = without_questions(train, self.source.eval, self.cfg.task)
        return (tokenize_pairs(self.tokenizer, train, self.cfg, "training"),
                tokenize_pairs(self.tokenizer, held_out, self.cfg, "held-out"))

    def _reference(self) -> dict[str, torch.Tensor]:
        """Every pair's reference log-probs, from the run directory's cache when it matches, else scored now
        (before any update or checkpoint load: the policy is still the initial one) and cached."""
        t0 = time.perf_counter()
        splits = {"train": self.train_set, "eval": self.eval_set}
        path, key = self.run_dir / REFERENCE_CACHE, fingerprint(self.cfg, self.learner.model, splits)
        cached = read_cache(path, key)
        computed = cached is None
        if computed:
            cached = score_reference(self.learner, splits)
            write_cache(path, key, cached)
        log.info("reference log-probs of %d pairs %s %s (%.1fs); training reads them from there, so no reference "
                 "model is kept in memory", len(self.train_set) + len(self.eval_set),
                 "computed once and cached to" if computed else "read from", path, time.perf_counter() - t0)
        return cached

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict, list[dict]]:
        """`dpo.epochs_per_step` DPO steps on the next `dpo.pairs_per_step` pairs; returns the step's metrics
        and the held-out replies `evaluate` adds on an eval step (the loop logs them after its eval)."""
        t0 = time.perf_counter()
        torch.set_num_threads(self.learner.threads)
        dpo = self.cfg.dpo
        index = self.cursor.take(dpo.pairs_per_step)
        rows = torch.tensor([r for i in index for r in (2 * i, 2 * i + 1)])  # pair i is rows 2i, 2i + 1
        batch = pair_batch([self.train_set[i] for i in index], self.learner.pad_id)
        metrics = preference_update(self.learner.trainer, batch, self.ref["train"][rows], dpo.loss, dpo.beta,
                                    dpo.label_smoothing, self.cfg.train.micro_batch_size, dpo.epochs_per_step)
        self.step += 1
        self.learner.version = self.step
        self._dumps = []
        return {"step": self.step, **metrics, "tokens": float(batch.mask.sum()),
                "dpo/epoch": self.cursor.epoch + self.cursor.position / self.cursor.size,
                "time/step_s": time.perf_counter() - t0}, self._dumps

    # -- evaluation, health, checkpoints ----------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out preference numbers (eval/loss, eval/preference_accuracy, eval/reward_margin) of the
        current weights against the cached reference, and with `dpo.task_accuracy` the RLVR held-out metrics
        (eval/accuracy, ...) of replies sampled at `eval.temperature` (0: greedy)."""
        learner, dpo = self.learner, self.cfg.dpo
        sums = reply_logps(learner.model, self.eval_set, learner.pad_id, self.cfg.train.micro_batch_size,
                           learner.trainer.temperature, learner.trainer.autocast)
        held_out = preference_metrics(sums, self.ref["eval"], self.eval_counts, dpo.loss, dpo.beta,
                                      dpo.label_smoothing)
        metrics = {f"eval/{k}": v for k, v in held_out.items()}
        if self.task_eval is not None:
            metrics.update(self.task_eval.metrics(self.learner, self.step, self._dumps))
        return metrics

    def check_health(self, record: dict) -> None:
        check_finite_loss(record, "DPO", "lower train.lr or dpo.beta, or train in float32 (train.precision fp32, "
                          "model.dtype float32)")
