"""A discrete-event simulator of rollout/training schedules (docs/simulator.md).

Pure Python and deterministic given a seed: N engines with continuous batching, a learner, and a
scheduling policy (sync, async k, tail batching, both), driven by a latency model (fitted from a
measured record, or assumed) and a reply-length distribution (measured groups, or a heavy-tailed
parametric one).

    from rollmill.simulate import LogNormalLengths, Policy, Workload, assumed_gpu_latency, simulate
    result = simulate(Workload(prompts=64, group_size=16, engines=8, engine_batch_size=128, prompt_tokens=512),
                      assumed_gpu_latency(engines=8), LogNormalLengths(median=400, p99=8000, cap=8192),
                      Policy("tail"), steps=15, warmup=5)
"""

from rollmill.simulate.core import simulate
from rollmill.simulate.lengths import (EmpiricalLengths, FixedLengths, LogNormalLengths, groups_from_record,
                                      parse_lengths)
from rollmill.simulate.model import (
    POLICIES,
    SHARED_CORES_CONTENTION,
    LatencyModel,
    Policy,
    Result,
    Workload,
    assumed_gpu_latency,
    average,
    fit_latency,
    parse_policy,
    policy_from_settings,
    workload_from_record,
)

__all__ = ["POLICIES", "SHARED_CORES_CONTENTION", "EmpiricalLengths", "FixedLengths", "LatencyModel",
           "LogNormalLengths", "Policy", "Result", "Workload", "assumed_gpu_latency", "average", "fit_latency",
           "groups_from_record", "parse_lengths", "parse_policy", "policy_from_settings", "simulate",
           "workload_from_record"]
