"""Pieces every pipeline shares: prompt encoding, the data cursor, seeding, run directories."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from rollmill.config import RunConfig, SamplingConfig, TaskConfig
from rollmill.rollout import SamplingParams
from rollmill.rollout.sampling import request_seed
from rollmill.tasks import Example

EVAL_SEED_BASE = 1_000_000_000  # env seeds of training episodes stay below this: held-out episodes are never trained on
# The sample index of a group's baseline sample (ReMax's greedy reply): generated and scored with the
# group, never trained; the sample queue hands its reward to the group's samples as info "baseline_reward".
BASELINE_INDEX = -1


def encode_prompt(tokenizer, example: Example, task: TaskConfig) -> list[int]:
    """The token ids the engine continues: the chat template (with generation prompt) or raw text."""
    chat = list(example.messages or [{"role": "user", "content": example.prompt}])
    if task.system_prompt and chat[0]["role"] != "system":  # a chat's own system message wins
        chat.insert(0, {"role": "system", "content": task.system_prompt})
    if task.chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in chat) if example.messages else example.prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling_params(cfg: SamplingConfig, n: int, temperature: float | None = None, max_new_tokens: int | None = None):
    return SamplingParams(
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        stop=tuple(cfg.stop),
        n=n,
    )


class PromptCursor:
    """Walks the indices of `size` training prompts in a seeded order, epoch after epoch; its state is two ints."""

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0):
        if size <= 0:
            raise ValueError("the training split is empty")
        self.size = size
        self.seed = seed
        self.epoch = epoch
        self.position = position
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_seed(run_seed: int, group_id: int, index: int) -> int:
    """The seed of sample `index` of group `group_id`: owned by the producer (group ids count the groups
    started), never by the learner's step, so rollout may run ahead and still be reproducible."""
    return request_seed(run_seed, group_id, index)


def env_seed(run_seed: int, group_id: int, below: int) -> int:
    """The env seed (initial state) of group `group_id`'s episodes, in [0, below)."""
    return request_seed(run_seed, group_id, -1) % below


def step_seed(seed: int, step: int) -> int:
    """A distinct, reproducible sampling seed for each step (so resume needs no generator state)."""
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


def spread(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `total`, so dumped samples cover several groups."""
    count = min(count, total)
    return [i * total // count for i in range(count)] if count else []


def new_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.log.run_root) / f"{cfg.name}-{stamp}"
