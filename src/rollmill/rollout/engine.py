"""The rollout engine interface: sample completions with their log-probs; take new weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. `stop` strings end a completion after the token that completes them."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    n: int = 1


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution it was actually
    sampled from (after temperature and top-p). `finish_reason` is "stop" (eos or a stop string)
    or "length" (hit max_new_tokens).
    """

    prompt_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: int
    info: dict = field(default_factory=dict)


class Engine(Protocol):
    """What the pipeline needs from a generation backend."""

    version: int

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None = None
    ) -> list[Completion]:
        """`sampling.n` completions for each prompt, ordered prompt by prompt."""
        ...

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load new policy weights; completions after this call carry `version`."""
        ...
