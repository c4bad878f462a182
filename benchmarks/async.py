"""Asynchronous training against its synchronous baseline, in one run, on SmolLM2-135M.

Two workloads with a long tail, each trained for the same wall-clock budget per mode:
- **agentic**: guess-the-number episodes whose env steps take a lognormal time (the `latency` env:
  median 2 s, sigma 1.0, so one step in a hundred takes over 20 s), as tool calls and sandboxed
  commands do;
- **rlvr**: "which number is larger?" with a 256-token budget, where SmolLM2's replies run from
  2 tokens to the cap (median ~40: a heavy-tailed length distribution).

Modes: `sync` (max_staleness 0, lockstep: the baseline), `k1`, `k2` (bounded staleness, env-level
asynchrony, partial rollouts), and for the agentic workload `redundant` (synchronous weights, but
G + 2 episodes per group, the first G to finish kept). `k1_yield` and `k2_yield` are `k1` and `k2`
with `runtime.rollout_yields` (rollout uses only the cores the learner leaves idle). For each: trained samples per second over the
budget, the ratio to sync, held-out success/accuracy after the budget, and where the time went (the
learner's wait for data, its update time, the engine's busy time).

    .venv/bin/python benchmarks/async.py                       # both workloads, every mode (~45 min)
    .venv/bin/python benchmarks/async.py --workloads agentic --budget-s 120

Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from runs import count_trained, quiet_logging

from rollmill.config import config_from_dict
from rollmill.runtime.local import LocalRoles
from rollmill.runtime.rl import RLJob

MODES = {  # mode -> (async section, runtime section)
    "sync": ({"max_staleness": 0}, {}),
    "k1": ({"max_staleness": 1}, {}),
    "k2": ({"max_staleness": 2}, {}),
    "redundant": ({"max_staleness": 0, "redundant_episodes": 2}, {}),
    # rollout's compute at the lowest OS priority: it takes only the cores the learner leaves idle
    "k1_yield": ({"max_staleness": 1}, {"rollout_yields": True}),
    "k2_yield": ({"max_staleness": 2}, {"rollout_yields": True}),
}


def workload(name: str, mode: str, args, run_root: str):
    common = {
        "model": {"source": args.model},
        "log": {"run_root": run_root, "progress": False, "trackers": [], "samples_per_step": 0},
        "checkpoint": {"every": 0},
        "train": {"steps": 10_000, "lr": 1e-5, "micro_batch_size": 8, "seed": args.seed},
        "algorithm": {"track_kl": False},  # no reference forward: the comparison is about scheduling
        "async": MODES[mode][0],
        "runtime": MODES[mode][1],
    }
    if name == "agentic":
        return config_from_dict({
            **common, "pipeline": "agentic", "name": f"bench-agentic-{mode}",
            "env": {"name": "latency", "eval_episodes": 32, "step_timeout_s": 60.0,
                    "kwargs": {"env": "guess_number", "env_kwargs": {"low": 1, "high": 8},
                               "median_s": args.median_s, "sigma": args.sigma}},
            "agent": {"max_turns": 3, "context": "keep_all", "action_format": "raw", "credit": "starpo"},
            "rollout": {"prompts_per_step": 2, "group_size": 8, "sampling": {"temperature": 1.0, "max_new_tokens": 8}},
            "eval": {"temperature": 0.0},
        })
    return config_from_dict({
        **common, "name": f"bench-rlvr-{mode}",
        "task": {"source": "arithmetic", "name": "larger_of_two", "eval_size": 64},
        "reward": {"functions": [{"name": "first_integer"}]},
        "rollout": {"prompts_per_step": 4, "group_size": 8,
                    "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens}},
        "eval": {"temperature": 0.0, "max_new_tokens": 16},
    })


def run_mode(name: str, mode: str, args, evaluate_before: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        cfg = workload(name, mode, args, tmp)
        job = RLJob(cfg, Path(tmp) / "run", LocalRoles)
        try:
            out = {"before": job.evaluate()[job.headline] if evaluate_before else None}
            records, trained_so_far = [], count_trained(job)
            stats = job.roles.workers[0].stats()
            busy0, start = stats.busy_s, time.perf_counter()
            while time.perf_counter() - start < args.budget_s:
                records.append(job.train_step()[0])
            wall, trained = time.perf_counter() - start, trained_so_far()
            engine_busy = stats.busy_s - busy0
            out.update(after=job.evaluate()[job.headline], steps=len(records), trained=trained, wall=wall,
                       sps=trained / wall, wait=sum(r["time/rollout_s"] for r in records) / wall,
                       learn=sum(r["time/train_s"] for r in records) / wall, engine=engine_busy / wall,
                       continued=stats.continued,
                       stale=sum(r.get("async/stale_groups", 0) for r in records))
            logging.info("%s %s: %d steps, %d samples in %.0f s (%.2f/s); held-out %.3f", name, mode, out["steps"],
                         trained, wall, out["sps"], out["after"])
            return out
        finally:
            job.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--workloads", default="agentic,rlvr")
    parser.add_argument("--modes", default="sync,k1,k2,redundant")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training wall time per mode")
    parser.add_argument("--median-s", type=float, default=2.0, help="agentic: median env step latency")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="rlvr: the reply budget (the tail's length)")
    parser.add_argument("--sigma", type=float, default=1.0, help="agentic: lognormal spread of the latency")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_logging()
    torch.manual_seed(args.seed)
    fields = {}
    print(f"{'workload':<9} {'mode':<10} {'steps':>5} {'samples':>7} {'samples/s':>9} {'x sync':>6} {'held-out':>14} "
          f"{'learner waits':>13} {'learner trains':>14} {'engine busy':>11} {'continued':>9} {'stale':>5}")
    for name in args.workloads.split(","):
        modes = [m for m in args.modes.split(",") if name == "agentic" or m != "redundant"]
        results = {}
        for mode in modes:
            results[mode] = run_mode(name, mode, args, evaluate_before=mode == modes[0])
        base = results[modes[0]]
        before = base["before"]
        for mode, r in results.items():
            ratio = r["sps"] / base["sps"]
            print(f"{name:<9} {mode:<10} {r['steps']:>5} {r['trained']:>7} {r['sps']:>9.2f} {ratio:>6.2f} "
                  f"{before:>6.3f}->{r['after']:<6.3f} {r['wait']:>13.0%} {r['learn']:>14.0%} {r['engine']:>11.0%} "
                  f"{r['continued']:>9} {r['stale']:>5.0f}")
            fields.update({f"{name}_{mode}_samples_per_s": round(r["sps"], 3), f"{name}_{mode}_x_sync": round(ratio, 2),
                           f"{name}_{mode}_heldout": round(r["after"], 3)})
        fields[f"{name}_heldout_before"] = round(before, 3)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
