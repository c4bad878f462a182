"""The `async` and `runtime` sections: how far rollout may run ahead of training, and where roles run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rollmill.config.base import Strict, check_device


class AsyncConfig(Strict):
    """Asynchronous training, ROLL Flash style (docs/architecture.md, "Sync and async").

    `max_staleness` k bounds what trains: a group is trained only if its oldest sampled token is at
    most k policy versions behind the weights being updated. 0 is the synchronous algorithm.
    """

    max_staleness: int = Field(0, ge=0, description="k: versions a trained token may lag (0 = synchronous)")
    env_async: bool | None = Field(
        None, description="each episode advances on its own and the engine batches whatever turns are ready; "
                          "False = lockstep turns; None = on unless the run is fully synchronous (k = 0, no "
                          "redundant episodes, extra groups or tail batching)")
    partial_rollout: Literal["continue", "finish"] = Field(
        "continue", description="a generation in flight when new weights arrive is aborted and continued under "
                                "them (continue) or finished under the old ones first (finish)")
    redundant_episodes: int = Field(0, ge=0, description="launch G + r samples per group and keep the first G to finish")
    extra_groups: int = Field(0, ge=0, description="groups launched beyond those a step needs (a slow group is then "
                                                   "trained a step later instead of holding this one up)")
    prompt_replication: bool = Field(False, description="spread a group's samples over all rollout workers")
    off_policy_correction: Literal["auto", "none", "tis", "decoupled_ppo"] = Field(
        "auto", description="auto: truncated IS against the behaviour log-probs when max_staleness > 0, none when 0")
    tis_cap: float = Field(2.0, gt=0.0, description="the truncated-IS cap the correction uses when algorithm.tis_cap is unset")

    @model_validator(mode="after")
    def _redundancy_needs_env_async(self) -> AsyncConfig:
        if self.env_async is False and (self.redundant_episodes or self.extra_groups):
            raise ValueError("redundant_episodes and extra_groups need env-level asynchrony: in lockstep every "
                             "episode waits for the slowest one, so the spare ones cannot overtake it; leave "
                             "env_async unset or true")
        return self


class TailBatchingConfig(Strict):
    """RollPacker's tail batching (docs/architecture.md, "Tail batching"): short rounds over-provision
    and train what finishes first; the prompts they cut off wait in a long-prompt queue and train
    together in a long round, with every sample run to the end (or to the round's time limit).
    Works synchronously and with `async.max_staleness` k > 0 (then a group is cut once it can no
    longer train within the staleness bound)."""

    enabled: bool = False
    prompt_factor: float = Field(1.25, ge=1.0, description="a short round launches ceil(prompts_per_step x this) "
                                                            "prompts and trains the first prompts_per_step to complete")
    sample_factor: float = Field(1.25, ge=1.0, description="a short round launches ceil(group_size x this) samples "
                                                            "per prompt and keeps the first group_size to finish")
    long_round_time_limit: float = Field(4.0, ge=0.0, description="a long round's samples still running after this "
                                         "many mean step times end where they are (kept, finish reason length); 0 = "
                                         "no limit")


class RoleResources(Strict):
    """What one actor of a role asks Ray for (`num_cpus`, `num_gpus`), and the torch threads its compute
    uses on either backend (`threads`)."""

    num_cpus: float = Field(1.0, ge=0.0, description="Ray scheduling only")
    num_gpus: float = Field(0.0, ge=0.0, description="Ray scheduling only")
    threads: int | None = Field(None, gt=0, description="torch threads for this role's compute; None = the "
                                                        "process's setting (every core; on Ray, the node's cores)")
    device: str | None = Field(None, description="this role's device (auto, cpu, cuda, cuda:N); None = model.device")

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str | None) -> str | None:
        return value if value is None else check_device(value)


class LearnerResources(RoleResources):
    """The learner: `ranks` data-parallel processes (FSDP2 over torch.distributed), each with these resources."""

    ranks: int = Field(1, gt=0, description="data-parallel training processes; > 1 runs the learner as a group "
                                            "of Ray actors that shard the weights with FSDP2 (runtime.backend: ray)")


class RuntimeConfig(Strict):
    """Where the roles run: one process (`local`) or Ray actors (`ray`), and how many of each."""

    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="join this Ray cluster; None starts a local head")
    rollout_workers: int = Field(1, gt=0, description="engines, each with its own copy of the weights")
    reward_workers: int = Field(2, gt=0, description="concurrent reward scorers (threads locally, actors on Ray)")
    learner: LearnerResources = LearnerResources()
    rollout: RoleResources = RoleResources()
    reward: RoleResources = RoleResources(num_cpus=0.0)
    poll_s: float = Field(0.05, gt=0.0, description="how often the driver collects finished samples")
    rollout_yields: bool = Field(False, description="run rollout's compute threads at the lowest OS priority, so "
                                                    "that on cores it shares with the learner it uses only what the "
                                                    "learner leaves idle (docs/architecture.md, \"Threads and shared cores\")")

    streamed_training: bool = Field(False, description="synchronous runs: the learner runs forward/backward on "
                                                       "each group as it completes, overlapping the rollout of "
                                                       "the rest (docs/architecture.md, \"Streamed training\")")

    @model_validator(mode="after")
    def _ray_needs_ray(self) -> RuntimeConfig:
        if self.backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ValueError("runtime.backend 'ray' needs Ray: pip install 'rollmill[ray]' (make test installs it)")
        return self
