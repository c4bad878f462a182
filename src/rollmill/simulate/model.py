"""What a simulation takes (the workload, the latency model, the policy) and what it returns, and how
the latency model is fitted from a measured record (`benchmarks/long_tail.py --record`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("sync", "async", "tail", "both")

# Shared cores: how much slower each of engine and learner runs while both compute on one machine. Set,
# not fitted: on the README's 2-core machine an update overlapped with rollout took 65-69 s instead
# of 46 s (about 1.45x); the measured record has no mode that isolates it.
SHARED_CORES_CONTENTION = 1.45


@dataclass(frozen=True)
class Workload:
    """The shape of one step and the rollout hardware.

    `shared_cores`: engines and learner run on the same cores (one machine), so while both compute each
    is slowed (`LatencyModel.contention`); False for a cluster, where they are separate hardware."""

    prompts: int  # P: groups per update
    group_size: int  # G: samples trained per group
    engines: int = 1
    engine_batch_size: int = 64  # rows one engine decodes per step at most (continuous batching)
    prompt_tokens: float = 0.0  # prefilled once per group and engine, when its first sample is admitted
    shared_cores: bool = False


@dataclass(frozen=True)
class LatencyModel:
    """How long things take, in seconds.

    - a decode step over `rows` rows: `decode_a + decode_b * rows`;
    - admitting a group's first sample on an engine: `prefill_s_per_token * prompt_tokens` (before the
      engine's next decode step; its other samples reuse the prefill, as engines merge and cache prompts);
    - an update: `train_c0 + train_c1 * x`, x the trained samples' reply tokens (or the trained samples
      when `train_per_sample`), then `sync_s` to publish the weights;
    - `contention`: with shared cores, the factor by which both engine and learner slow down while
      both compute (1 = no contention). A policy with `rollout_yields` instead pauses the engines
      while the learner works and leaves the learner at full speed."""

    decode_a: float
    decode_b: float
    prefill_s_per_token: float = 0.0
    train_c0: float = 0.0
    train_c1: float = 0.0
    train_per_sample: bool = False
    sync_s: float = 0.0
    contention: float = 1.0

    def decode_step_s(self, rows: int) -> float:
        return self.decode_a + self.decode_b * rows

    def update_s(self, samples: int, tokens: int) -> float:
        """One update and its weight sync, at full speed."""
        return self.train_c0 + self.train_c1 * (samples if self.train_per_sample else tokens) + self.sync_s


@dataclass(frozen=True)
class Policy:
    """How rollout and training are scheduled (docs/simulator.md has each rule).

    `name`: sync | async (bounded staleness `k`) | tail (tail batching, synchronous) | both (tail
    batching under bounded staleness `k`, 1 unless set). `redundant`: extra samples per group, the first G to finish are kept
    (sync and async). `prompt_factor`, `sample_factor`: a short round's over-provisioning (tail and
    both). `rollout_yields`: on shared cores, engines pause while the learner works."""

    name: str = "sync"
    k: int = 0
    redundant: int = 0
    prompt_factor: float = 1.25
    sample_factor: float = 1.25
    rollout_yields: bool = False

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; expected one of {', '.join(POLICIES)}")
        if self.name == "async" and self.k < 1:
            raise ValueError("the async policy needs k >= 1 (k = 0 is the sync policy)")
        if self.redundant and self.name in ("tail", "both"):
            raise ValueError("tail batching over-provisions samples itself (sample_factor); leave redundant at 0")
        if self.name == "both" and self.k == 0:
            object.__setattr__(self, "k", 1)  # frozen: set once, here


@dataclass(frozen=True)
class Result:
    """Predicted figures over the measured steps (those after the warm-up).

    `occupancy`: busy engine rows / (engines x engine_batch_size), averaged over the measured wall time
    (idle or paused engines count as empty); `rows_per_step`: mean rows per decode step (engine steps
    only); `learner_idle`: the share of wall time the learner neither trains nor syncs; `long_rounds`,
    `deferred` (prompts sent to the long-prompt queue) and `stale` (groups dropped for staleness) are
    counts over the measured steps."""

    policy: str
    steps: int
    step_s: float
    s_per_sample: float
    occupancy: float
    rows_per_step: float
    learner_idle: float
    long_rounds: float
    deferred: float
    stale: float


def average(results: list[Result]) -> Result:
    """The mean of several runs' results (e.g. over seeds)."""
    first = results[0]
    fields = {name: sum(getattr(r, name) for r in results) / len(results)
              for name in ("step_s", "s_per_sample", "occupancy", "rows_per_step", "learner_idle",
                           "long_rounds", "deferred", "stale")}
    return Result(policy=first.policy, steps=first.steps, **fields)


# -- fitting from a measured record -------------------------------------------------------------------
def _line(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Weighted least squares y = a + b x over (x, y, weight); a flat line when x does not vary, and a
    slope clipped at 0 (time never falls as work grows: a negative slope is noise)."""
    total = sum(w for _, _, w in points)
    mx = sum(x * w for x, _, w in points) / total
    my = sum(y * w for _, y, w in points) / total
    var = sum(w * (x - mx) ** 2 for x, _, w in points)
    b = max(0.0, sum(w * (x - mx) * (y - my) for x, y, w in points) / var) if var > 0 else 0.0
    return my - b * mx, b


def fit_latency(record: dict, contention: float = SHARED_CORES_CONTENTION) -> LatencyModel:
    """The latency model from a measured record: decode steps (weighted by how many were timed),
    the learner's updates (per token, or per sample where tokens are missing), prefill and sync as
    recorded. The record does not isolate `contention`; it is set (docs/simulator.md)."""
    a, b = _line([(rows, total / steps, steps) for rows, steps, total in record["decode_step_s"] if steps > 0])
    train = record["train"]
    per_sample = any(tokens is None for _, tokens, _ in train)
    c0, c1 = _line([(samples if per_sample else tokens, seconds, 1.0) for samples, tokens, seconds in train])
    return LatencyModel(decode_a=a, decode_b=b, prefill_s_per_token=record.get("prefill_s_per_token", 0.0),
                        train_c0=c0, train_c1=c1, train_per_sample=per_sample, sync_s=record.get("sync_s", 0.0),
                        contention=contention)


def assumed_gpu_latency(engines: int) -> LatencyModel:
    """Assumed, not measured, GPU-like latencies for cluster predictions: each engine a 7B-class model
    on one H800-class GPU (10 ms per decode step plus 0.1 ms per row, prefill at 100k tokens/s), and a
    learner with one GPU per engine training 2,500 tokens/s each, 5 s of fixed cost per update and 2 s
    to publish the weights; engines and learner on separate GPUs (docs/simulator.md)."""
    return LatencyModel(decode_a=0.010, decode_b=1e-4, prefill_s_per_token=1e-5, train_c0=5.0,
                        train_c1=1.0 / (2500 * engines), sync_s=2.0)


def workload_from_record(record: dict) -> Workload:
    """The measured workload; it ran on one machine, so engines and learner shared the cores."""
    w = record["workload"]
    return Workload(prompts=w["prompts_per_step"], group_size=w["group_size"], engines=w.get("engines", 1),
                    engine_batch_size=w["engine_batch_size"], prompt_tokens=w.get("prompt_tokens_mean", 0.0),
                    shared_cores=True)


def policy_from_settings(settings: dict) -> Policy:
    """The policy a measured mode ran with (its `settings` in the record)."""
    k = settings.get("max_staleness", 0)
    tail = settings.get("tail_batching", False)
    name = ("both" if k else "tail") if tail else ("async" if k else "sync")
    return Policy(name=name, k=k, redundant=settings.get("redundant_episodes", 0),
                  prompt_factor=settings.get("prompt_factor", 1.25), sample_factor=settings.get("sample_factor", 1.25),
                  rollout_yields=settings.get("rollout_yields", False))


def parse_policy(text: str, **options) -> Policy:
    """`sync`, `tail`, `both`, `async` (k = 1) or `asyncK` / `async:K` / `kK` (e.g. `async2`, `k2`)."""
    name = text.strip().lower()
    for prefix in ("async:", "async", "k"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return Policy(name="async", k=int(name[len(prefix):]), **options)
    if name == "async":
        return Policy(name="async", k=1, **options)
    return Policy(name=name, **options)


def ceil_factor(n: int, factor: float) -> int:
    """ceil(n x factor), robust to float noise (10 x 1.1 is 11, not 12)."""
    return math.ceil(n * factor - 1e-9)
