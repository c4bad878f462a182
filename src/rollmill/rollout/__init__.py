"""Rollout engines: the interface, the in-process transformers engine, sampling helpers."""

from rollmill.rollout.engine import Completion, Engine, SamplingParams
from rollmill.rollout.hf import HFEngine

__all__ = ["Completion", "Engine", "HFEngine", "SamplingParams"]
