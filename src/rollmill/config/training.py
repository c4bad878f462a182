"""The `train`, `checkpoint`, `eval` and `log` sections: the update schedule and what a run keeps and reports."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rollmill.config.base import Strict


class TrainConfig(Strict):
    """Optimizer and update schedule. One step = one rollout batch = `ppo_epochs` passes over it."""

    steps: int = Field(30, gt=0)
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = Field(1.0, gt=0.0)
    ppo_epochs: int = Field(1, gt=0)
    mini_batch_size: int | None = Field(None, gt=0, description="sequences per optimizer step; None = whole batch")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward/backward under bfloat16 autocast, weights and optimizer in float32 "
                            "(faster on CPUs with bf16 instructions and on GPUs; log-probs then differ from the "
                            "engine's by more, see rollout.logprob_tolerance)")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} > train.steps={self.steps}: the learning rate "
                             "would never reach train.lr")
        return self


class CheckpointConfig(Strict):
    every: int = Field(10, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep: int = Field(2, gt=0)


class EvalConfig(Strict):
    """Held-out evaluation: `n` samples per prompt at `temperature` (0 = greedy); pass@k for k <= n."""

    every: int = Field(0, ge=0, description="steps between evals; 0 = only before and after training")
    before: bool = True
    n: int = Field(1, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    max_new_tokens: int | None = Field(None, gt=0)


TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow"]


class LogConfig(Strict):
    """Where a run's metrics go besides its metrics.jsonl: `trackers` mirrors each step's scalars to the
    dashboards listed, each local or offline (`rollmill.track.trackers` says where each writes)."""

    run_root: str = "runs"
    samples_per_step: int = Field(4, ge=0)
    trackers: list[TrackerName] = Field(
        default_factory=lambda: ["tensorboard"],
        description="tensorboard (run_dir/tensorboard), wandb (offline run in run_dir/wandb), trackio (its local "
                    "database), mlflow (run_dir/mlflow.db); [] = metrics.jsonl only")
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_flag(cls, data: Any) -> Any:
        """`tensorboard: true/false`, the key `trackers` replaced, still reads as [tensorboard] or [] so that
        runs whose config.yaml has it can resume; configs are written with `trackers` only."""
        if not isinstance(data, dict) or "tensorboard" not in data:
            return data
        data = dict(data)
        flag = data.pop("tensorboard")
        if "trackers" in data:
            raise ValueError("log.tensorboard is the old form of log.trackers: give only log.trackers")
        if not isinstance(flag, bool):
            raise ValueError(f"log.tensorboard = {flag!r} must be true or false; better, use log.trackers")
        warnings.warn("log.tensorboard is deprecated: use log.trackers ([tensorboard], or [] for none)",
                      FutureWarning, stacklevel=2)
        return {**data, "trackers": ["tensorboard"] if flag else []}

    @field_validator("trackers")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{repeated} listed more than once")
        return names
