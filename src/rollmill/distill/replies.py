"""Replies for distillation: the teacher's, kept per prompt; a reply as a training example; and the check
that teacher and student share one vocabulary."""

from __future__ import annotations

import json
import logging

from rollmill.config import ConfigError, RunConfig
from rollmill.input_checks import model_problems
from rollmill.models import load_tokenizer
from rollmill.sft import Tokenized
from rollmill.tasks import Example
from rollmill.types import GroupSpec, Trajectory

log = logging.getLogger(__name__)


def check_teacher(cfg: RunConfig, student_tokenizer) -> None:
    """Raise ConfigError naming `distill.teacher` when its folder is unusable or its vocabulary is not the
    student's: the losses compare the two models' probabilities of the same token ids."""
    teacher = cfg.distill.teacher
    problems = [(key.replace("model.", "distill.teacher.", 1), value, message)
                for key, value, message in model_problems(teacher)]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{k} = {v!r}: {m}" for k, v, m in problems))
    teacher_tokenizer = load_tokenizer(teacher)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"distill.teacher (source {teacher.source!r}) has a tokenizer of {len(teacher_tokenizer)} "
                          f"tokens that is not the student's ({len(student_tokenizer)} tokens, model.source "
                          f"{cfg.model.source!r}): distillation compares the two models token by token, so both must "
                          "use one vocabulary; pick a teacher of the student's model family")
    if getattr(teacher_tokenizer, "chat_template", None) != getattr(student_tokenizer, "chat_template", None):
        log.warning("distill.teacher's chat template differs from the student's: the teacher writes its replies to "
                    "prompts in its own template, and both models then read them after the student's")


def domain_of(example: Example) -> str | None:
    """The `task.mix` source (DDK domain) an example comes from; None in a run of one task."""
    return example.meta.get("source")


def reply_example(prompt_ids: list[int], reply_ids: list[int]) -> Tokenized:
    """A prompt and a reply as one example whose loss covers the reply's tokens only."""
    return Tokenized((*prompt_ids, *reply_ids), (0,) * len(prompt_ids) + (1,) * len(reply_ids))


def generate(worker, specs: list[GroupSpec]) -> list[Trajectory]:
    """Every sample of `specs` from a rollout worker, played together (lockstep); waits for all of them."""
    worker.submit(specs, lockstep=True)
    wanted = sum(len(s.indices) for s in specs)
    out: list[Trajectory] = []
    while len(out) < wanted:
        out += worker.poll(timeout=1.0)
    return sorted(out, key=lambda t: (t.group_id, t.index))


class TeacherReplies:
    """The teacher's replies, kept per prompt of a split ("train", "eval") so each is generated once, with
    whether the task's verifier found each correct. Saved in checkpoints as JSON."""

    def __init__(self, kept: dict[str, list[tuple[list[int], bool]]] | None = None):
        self.kept = kept or {}

    def has(self, split: str, index: int) -> bool:
        return f"{split}/{index}" in self.kept

    def add(self, split: str, index: int, reply_ids: list[int], correct: bool) -> None:
        self.kept.setdefault(f"{split}/{index}", []).append((list(reply_ids), bool(correct)))

    def get(self, split: str, index: int) -> list[list[int]]:
        """The token ids of the teacher's replies to prompt `index` of `split`."""
        return [ids for ids, _ in self.kept[f"{split}/{index}"]]

    def accuracy(self, split: str) -> float:
        """The share of the kept replies to `split`'s prompts that the verifier scored correct."""
        marks = [ok for key, replies in self.kept.items() if key.startswith(f"{split}/") for _, ok in replies]
        return sum(marks) / len(marks)

    def to_json(self) -> str:
        return json.dumps(self.kept)

    @classmethod
    def from_json(cls, text: str) -> "TeacherReplies":
        return cls({key: [(ids, ok) for ids, ok in replies] for key, replies in json.loads(text).items()})
