"""vLLM behind rollmill's engine interface (optional: `make install-vllm`).

The engine runs vLLM's core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight update
is vLLM's in-place `reload_weights` on the served model: no restart, no file, no pickling of the
state across processes. Log-probs are vLLM's processed ones: those of the distribution the token was
sampled from (after temperature and top-p), the same quantity `HFEngine` reports. Automatic prefix
caching gives KV reuse across the turns of an episode; it is reset on every weight update.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from rollmill.rollout.engine import BatchEngine, Completion, Request
from rollmill.rollout.sampling import request_seed


class VLLMEngine(BatchEngine):
    """Generation with vLLM on a saved transformers model folder."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer, version: int = 0, max_model_len: int | None = None,
                 kv_cache_gib: int = 4, dtype: str = "float32", update_timeout_s: float = 300.0):
        super().__init__()
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
        self.llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                       enable_prefix_caching=True, logprobs_mode="processed_logprobs", seed=0)

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

    def _run_batch(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        if any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("VLLMEngine.generate: every prompt needs at least one token")
        params = []
        for r in requests:
            sp = r.sampling
            greedy = sp.temperature == 0
            params.append(VLLMSampling(n=1, temperature=sp.temperature, top_p=1.0 if greedy else sp.top_p,
                                       max_tokens=sp.max_new_tokens, stop=list(sp.stop) or None,
                                       include_stop_str_in_output=True, logprobs=0, top_k=0))
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        # Per-request seeds crash vLLM's CPU runner ("CPU Generator does not use offset"); with the core
        # in this process, unseeded requests draw from torch's global generator, seeded here from the
        # batch's request seeds instead (so a sample depends on its batch: vLLM runs are reproducible
        # batch by batch, not sample by sample as the hf engines are).
        with torch.random.fork_rng():
            torch.manual_seed(request_seed(*(r.seed for r in requests)) % 2**63)
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for r, out in zip(requests, outputs):
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)]
            completions.append(Completion(
                prompt_index=0, prompt_ids=list(r.prompt_ids), token_ids=tokens, logprobs=logprobs,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                finish_reason="stop" if sample.finish_reason == "stop" else "length", policy_version=self.version,
                request_id=r.id,
            ))
        return completions

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load `state` (transformers names) into the served model in place; fails after `update_timeout_s`."""
        weights = [(name, t.detach()) for name, t in state.items()]
        try:
            self.llm.collective_rpc("reload_weights", timeout=self.update_timeout_s,
                                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        except TimeoutError as e:
            raise TimeoutError(f"vllm engine: weight update to version {version} did not finish within "
                               f"{self.update_timeout_s:g}s") from e
        self.llm.reset_prefix_cache()  # cached K/V belong to the old weights
        self.version = version
