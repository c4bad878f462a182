"""The rollout engine interface: sample completions with their log-probs; take new weights."""

from __future__ import annotations

import threading
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


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], engine: str) -> None:
    """Copy `state` into `model` in place; a no-op when `state` already is the model's own tensors."""
    own = model.state_dict()
    if all(name in state and state[name].data_ptr() == t.data_ptr() for name, t in own.items()):
        return
    missing = set(own) - set(state)
    if missing:
        raise ValueError(f"{engine} engine: update_weights state misses {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, t in own.items():
            if state[name].shape != t.shape:
                raise ValueError(f"{engine} engine: update_weights got {name} with shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(t.shape)}")
            t.copy_(state[name])


class WeightSyncError(RuntimeError):
    """A weight update failed or hung; the message names the engine and the version."""


def sync_weights(engine: Engine, state: dict[str, torch.Tensor], version: int, timeout_s: float) -> None:
    """`engine.update_weights` that raises `WeightSyncError` if it fails or takes longer than `timeout_s`.

    A hung update is left running in a daemon thread (Python cannot kill it); the engine must be
    treated as broken after the error, which is why it is an error and not a warning.
    """
    name = getattr(engine, "name", type(engine).__name__)
    failure: list[BaseException] = []

    def update():
        try:
            engine.update_weights(state, version)
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    worker = threading.Thread(target=update, name=f"weight-sync-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise WeightSyncError(f"{name} engine: weight update to version {version} did not finish within {timeout_s:g}s")
    if failure:
        raise WeightSyncError(f"{name} engine: weight update to version {version} failed: {failure[0]}") from failure[0]
