"""The rollout engine interface: requests in, sampled completions with their log-probs out; new weights in.

An engine serves one weight version at a time. Work is request-level: `submit` queues samples (each
with its own seed), `step` advances generation by one scheduling round and returns the completions
that finished, `abort` stops requests and returns what they had produced so far. `generate` and `run`
are the blocking forms built on those three.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from rollmill.rollout.sampling import random_seed, request_seed


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. `stop` strings end a completion after the token that completes them."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    n: int = 1


@dataclass(frozen=True)
class Request:
    """One sample to generate: a continuation of `prompt_ids` drawn with `seed`.

    `offset` > 0 continues a partial rollout: the last `offset` prompt tokens were sampled earlier
    (under older weights), token draws continue at index `offset`, and stop strings see them.
    `sampling.n` is ignored (one request is one sample); `sampling.max_new_tokens` is what is left.
    """

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    id: Hashable = None
    offset: int = 0


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution it was actually
    sampled from (after temperature and top-p). `finish_reason` is "stop" (eos or a stop string),
    "length" (hit max_new_tokens) or "abort" (stopped by `Engine.abort`: a partial rollout).
    """

    prompt_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: int
    info: dict = field(default_factory=dict)
    request_id: Hashable = None
    versions: list[int] = field(default_factory=list)  # per token, filled by `EngineDriver` (may span updates)


class Engine(Protocol):
    """What the rollout side needs from a generation backend."""

    name: str
    version: int

    def submit(self, requests: list[Request]) -> None:
        """Queue samples; they start as soon as the batch has room."""
        ...

    def step(self) -> list[Completion]:
        """Advance every running sample by one scheduling round; return those that finished."""
        ...

    def abort(self, ids: set | None = None) -> list[Completion]:
        """Stop the requests with these ids (all when None); return each one's tokens so far ("abort")."""
        ...

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running."""
        ...

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None = None) -> list[Completion]:
        """`sampling.n` completions for each prompt, ordered prompt by prompt (blocking)."""
        ...

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load new policy weights; completions after this call carry `version`."""
        ...


def hit_stop(tokenizer, request: Request, tokens: list[int]) -> bool:
    """Whether the reply so far ends in one of the request's stop strings (the tokens a continued
    rollout sampled earlier, at the end of its prompt, count too)."""
    stop = request.sampling.stop
    if not stop:
        return False
    tail = tokens[-16:]
    earlier = min(request.offset, 16 - len(tail))
    if earlier > 0:
        tail = list(request.prompt_ids[-earlier:]) + tail
    text = tokenizer.decode(tail, skip_special_tokens=True)
    return any(s in text for s in stop)


class EngineBase:
    """The blocking calls every engine shares, built on `submit`/`step`."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None = None) -> list[Completion]:
        """`sampling.n` samples of each prompt; sample j of prompt i draws with `request_seed(seed, i, j)`."""
        base = random_seed() if seed is None else seed
        one = replace(sampling, n=1)
        requests = [Request(tuple(p), one, request_seed(base, i, j), id=(i, j))
                    for i, p in enumerate(prompts) for j in range(sampling.n)]
        out = self.run(requests)
        for c, r in zip(out, requests):
            c.prompt_index = r.id[0]
        return out

    def run(self, requests: list[Request]) -> list[Completion]:
        """Generate `requests` to the end and return their completions in request order.

        Meant for an engine with nothing else in flight: completions of other requests are an error."""
        for r in requests:
            if not r.prompt_ids:
                raise ValueError(f"{type(self).__name__}.generate: every prompt needs at least one token")
        ids = [r.id if r.id is not None else ("run", k) for k, r in enumerate(requests)]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be distinct")
        self.submit([replace(r, id=i) for r, i in zip(requests, ids)])
        done: dict = {}
        while len(done) < len(ids):
            for c in self.step():
                done[c.request_id] = c
        out = [done[i] for i in ids]
        for c, r in zip(out, requests):
            c.request_id = r.id
        return out


class BatchEngine(EngineBase):
    """`submit`/`step` for engines that generate a whole batch in one call (`_run_batch`): a step runs
    everything queued to the end, so requests never overlap and `abort` only drops queued ones."""

    def __init__(self):
        self._queue: list[Request] = []

    def submit(self, requests: list[Request]) -> None:
        self._queue.extend(requests)

    def step(self) -> list[Completion]:
        batch, self._queue = self._queue, []
        return self._run_batch(batch) if batch else []

    def abort(self, ids: set | None = None) -> list[Completion]:
        dropped = [r for r in self._queue if ids is None or r.id in ids]
        self._queue = [r for r in self._queue if not (ids is None or r.id in ids)]
        return [Completion(0, list(r.prompt_ids), [], [], "", "abort", self.version, request_id=r.id) for r in dropped]

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def _run_batch(self, requests: list[Request]) -> list[Completion]:
        raise NotImplementedError


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], engine: str) -> None:
    """Copy `state` into `model` in place: all of its tensors, or some (an update that sends only what
    changed, e.g. LoRA's adapted layers); a no-op when `state` already is the model's own tensors.
    A name the model does not have, or a shape that differs, is an error (nothing is copied then)."""
    own = model.state_dict()
    if all(name in state and state[name].data_ptr() == t.data_ptr() for name, t in own.items()):
        return
    unknown = set(state) - set(own)
    if unknown:
        raise ValueError(f"{engine} engine: update_weights got {len(unknown)} tensors the model does not have, "
                         f"e.g. {sorted(unknown)[:3]}")
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise ValueError(f"{engine} engine: update_weights got {name} with shape {tuple(t.shape)}, "
                             f"expected {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)


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
