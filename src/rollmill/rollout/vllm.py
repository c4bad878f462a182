"""vLLM behind rollmill's engine interface (optional: `make install-vllm`).

The engine runs vLLM's core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and drives its
`LLMEngine` request by request: `submit` adds requests, `step` runs one vLLM scheduling step (every
running request gains a token), `abort` removes requests and returns the tokens they had. vLLM
reports each step's new tokens (delta outputs); the engine keeps every request's tokens and log-probs
as they arrive, so an abort returns exactly what vLLM generated.

A weight update is vLLM's in-place `reload_weights` on the served model: no restart, no file, no
pickling of the state across processes. Log-probs are vLLM's processed ones: those of the
distribution the token was sampled from (after temperature and top-p), the same quantity `HFEngine`
reports. Automatic prefix caching gives KV reuse across the turns of an episode; it is reset on
every weight update.

Every request carries its own seed (vLLM draws its sampling noise from a per-request generator), so
a sample depends on its seed and its logits, not on what shares its batch or when it was submitted.
vLLM's noise is not rollmill's (`sampling.uniform`): the same request gives other tokens here than
on the hf engines. A continued rollout (`Request.offset` > 0) draws with a seed derived from (seed,
offset), so unlike on `HFEngine` it does not reproduce the tokens an uninterrupted run would have
drawn.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rollmill.rollout.engine import Completion, EngineBase, Request, hit_stop
from rollmill.rollout.sampling import request_seed


@dataclass
class _Live:
    """A request in vLLM and what it has generated so far."""

    request: Request
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class VLLMEngine(EngineBase):
    """Request-level generation with vLLM on a saved transformers model folder."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer, version: int = 0, max_model_len: int | None = None,
                 kv_cache_gib: int = 4, dtype: str = "float32", update_timeout_s: float = 300.0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("the vllm engine needs vLLM: run `make install-vllm` and use .venv-vllm/bin/python "
                              f"(import failed: {e})") from e
        self.tokenizer = tokenizer
        self.version = version
        self.update_timeout_s = update_timeout_s
        # Seeded requests crash vLLM's CPU runner when a prompt is prefilled in chunks (it rewinds the
        # request's generator, which a CPU generator cannot do: "CPU Generator does not use offset"),
        # so prompts are prefilled whole; vLLM then raises its token budget to at least max_model_len.
        self.llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                       enable_prefix_caching=True, enable_chunked_prefill=False,
                       logprobs_mode="processed_logprobs", seed=0)
        self._core = self.llm.llm_engine
        self._live: dict[str, _Live] = {}  # by vLLM request id
        self._keys = itertools.count()

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> VLLMEngine:
        """Serve an in-memory transformers model: saved once to a temporary folder vLLM reads at start-up."""
        folder = Path(tempfile.mkdtemp(prefix="rollmill-vllm-"))
        try:
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            engine = cls(folder, tokenizer, **kwargs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        weakref.finalize(engine, shutil.rmtree, folder, True)  # vLLM has read it; remove it with the engine
        return engine

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running in vLLM."""
        return bool(self._live)

    def submit(self, requests: list[Request]) -> None:
        """Hand requests to vLLM's scheduler; they start at the next `step` that has room for them."""
        from vllm.inputs import TokensPrompt

        for r in requests:
            if not r.prompt_ids:
                raise ValueError("VLLMEngine.generate: every prompt needs at least one token")
        for r in requests:
            key = str(next(self._keys))  # vLLM wants string ids; rollmill ids may be any hashable
            self._core.add_request(key, TokensPrompt(prompt_token_ids=list(r.prompt_ids)), self._params(r))
            self._live[key] = _Live(r)

    def step(self) -> list[Completion]:
        """Run one vLLM engine step; return the requests that finished in it."""
        if not self._live:
            return []
        # torch sets a thread's OpenMP thread count lazily, at its first parallel op; in a thread that has
        # run none yet (the driver's engine thread) vLLM's CPU attention would size its schedule before
        # that and its kernel after ("Check failed: input->metadata->thread_num == thread_num")
        torch.get_num_threads()
        finished = []
        for out in self._core.step():
            reason = self._record(out)
            if reason is not None:
                finished.append(self._end(out.request_id, reason))
        return finished

    def abort(self, ids: set | None = None) -> list[Completion]:
        """Stop requests (all when `ids` is None): each returns the tokens and log-probs vLLM generated
        for it so far (none if it had not started), finish reason "abort"."""
        keys = [k for k, live in self._live.items() if ids is None or live.request.id in ids]
        if keys:
            self._core.abort_request(keys)
        return [self._end(k, "abort") for k in keys]

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load `state` (transformers names) into the served model in place; fails after `update_timeout_s`.

        Refused while requests are in flight: their cached K/V belong to the old weights (abort or
        finish them first, as `EngineDriver` does)."""
        if self._live:
            raise RuntimeError(f"vllm engine: update_weights with {len(self._live)} requests in flight; "
                               "abort or finish them first")
        weights = [(name, t.detach()) for name, t in state.items()]
        try:
            self.llm.collective_rpc("reload_weights", timeout=self.update_timeout_s,
                                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        except TimeoutError as e:
            raise TimeoutError(f"vllm engine: weight update to version {version} did not finish within "
                               f"{self.update_timeout_s:g}s") from e
        if not self.llm.reset_prefix_cache():  # cached K/V belong to the old weights
            raise RuntimeError("vllm engine: could not reset the prefix cache after a weight update")
        self.version = version

    def _params(self, r: Request):
        from vllm import SamplingParams as VLLMSampling
        from vllm.sampling_params import RequestOutputKind

        sp = r.sampling
        greedy = sp.temperature == 0
        # A continuation gets a seed of its own: reusing `seed` would replay the noise of the sample's
        # first tokens (vLLM's generators cannot skip ahead to draw `offset`).
        seed = request_seed(r.seed, r.offset) if r.offset else r.seed
        return VLLMSampling(n=1, temperature=sp.temperature, top_p=1.0 if greedy else sp.top_p, top_k=0,
                            max_tokens=sp.max_new_tokens, stop=list(sp.stop) or None,
                            include_stop_str_in_output=True, logprobs=0, seed=seed,
                            output_kind=RequestOutputKind.DELTA)

    def _record(self, out) -> str | None:
        """Append a step's new tokens and log-probs to their request; return its finish reason if it ended."""
        live = self._live[out.request_id]
        sample = out.outputs[0]  # only this step's tokens (delta outputs)
        live.tokens.extend(sample.token_ids)
        live.logprobs.extend(step[tok].logprob for step, tok in zip(sample.logprobs, sample.token_ids))
        # vLLM's stop check sees only the reply; a stop string that began in the earlier-sampled tokens
        # of a continued rollout is caught here, and the request is ended in vLLM too
        if live.request.offset and hit_stop(self.tokenizer, live.request, live.tokens):
            if not out.finished:
                self._core.abort_request([out.request_id])
            return "stop"
        if not out.finished:
            return None
        if sample.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vllm engine: a request ended with finish reason {sample.finish_reason!r}")
        return sample.finish_reason

    def _end(self, key: str, reason: str) -> Completion:
        live = self._live.pop(key)
        return Completion(
            prompt_index=0, prompt_ids=list(live.request.prompt_ids), token_ids=live.tokens, logprobs=live.logprobs,
            text=self.tokenizer.decode(live.tokens, skip_special_tokens=True), finish_reason=reason,
            policy_version=self.version, request_id=live.request.id,
        )
