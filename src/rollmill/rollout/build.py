"""Pick and build the engine a run's config asks for."""

from __future__ import annotations

import logging

import torch

from rollmill.rollout.decoder import fast_path_problem
from rollmill.rollout.hf import HFEngine
from rollmill.rollout.hf_generic import GenericHFEngine

log = logging.getLogger(__name__)


def build_engine(cfg, model, tokenizer):
    """The engine for `cfg` (a RolloutConfig) on an in-memory model, on the model's device; `hf` falls back
    to `hf_generic` (with a log line) for architectures the fast forward does not cover and off the CPU
    (vLLM is the GPU engine; hf_generic is the plain CUDA path)."""
    bf16 = cfg.dtype == "bfloat16"
    if cfg.engine == "vllm":
        from rollmill.rollout.vllm import VLLMEngine

        return VLLMEngine.from_model(model, tokenizer, update_timeout_s=cfg.weight_sync_timeout_s,
                                     dtype="bfloat16" if bf16 else str(model.dtype).removeprefix("torch."))
    problem = fast_path_problem(model) if cfg.engine == "hf" else None
    if cfg.engine == "hf" and model.device.type != "cpu":
        problem = f"its fast path is for CPUs and the model is on {model.device}"
    if cfg.engine == "hf_generic" or problem:
        if problem:
            log.info("engine hf: %s; using hf_generic (slower, same results)", problem)
        if bf16:
            log.warning("rollout.dtype=bfloat16 is ignored by hf_generic: it runs the model in its own dtype")
        return GenericHFEngine(model, tokenizer, batch_size=cfg.batch_size)
    return HFEngine(model, tokenizer, batch_size=cfg.batch_size, prefix_cache_mb=cfg.prefix_cache_mb,
                    dtype=torch.bfloat16 if bf16 else None)
