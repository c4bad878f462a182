"""Rollout engines: the interface, the fast in-process transformers engine, its generic fallback."""

from rollmill.rollout.build import build_engine
from rollmill.rollout.engine import Completion, Engine, SamplingParams, WeightSyncError, sync_weights
from rollmill.rollout.hf import HFEngine
from rollmill.rollout.hf_generic import GenericHFEngine

__all__ = ["Completion", "Engine", "GenericHFEngine", "HFEngine", "SamplingParams", "WeightSyncError", "build_engine",
           "sync_weights"]
