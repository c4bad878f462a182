"""Tail batching against synchronous and asynchronous training, in one run, on SmolLM2-135M.

The workload has a heavy-tailed reply length: "which number is larger?" with a 256-token budget,
where SmolLM2's replies run from 2 tokens to the cap (median ~40). Each mode trains the same number
of steps (so the same number of samples) from the same weights:

- `sync`: max_staleness 0, every step waits for its slowest reply (the baseline);
- `tail`: synchronous, with tail batching (short rounds over-provision prompts and samples and
  train what finishes first; the cut-off prompts train together in long rounds);
- `k1`: max_staleness 1 with rollout yielding the cores to the learner (the best async setting on a
  machine where both share the cores; see benchmarks/async.py).

For each: wall time per trained sample and its ratio to sync, the engine's mean rows per decode step
(how full its batch ran: the tail runs a few rows at a time), the long rounds and deferred prompts,
and held-out accuracy after the same number of trained samples.

    .venv/bin/python benchmarks/long_tail.py                 # 5 steps per mode (~25 min here)
    .venv/bin/python benchmarks/long_tail.py --steps 3 --modes sync,tail

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

MODES = {
    "sync": {},
    "tail": {"tail_batching": {"enabled": True}},
    "k1": {"async": {"max_staleness": 1}, "runtime": {"rollout_yields": True}},
}


def config(mode: str, args, run_root: str):
    return config_from_dict({
        "name": f"bench-long-tail-{mode}",
        "model": {"source": args.model},
        "task": {"source": "arithmetic", "name": "larger_of_two", "eval_size": 64},
        "reward": {"functions": [{"name": "first_integer"}]},
        "rollout": {"prompts_per_step": 4, "group_size": 8,
                    "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens}},
        "eval": {"temperature": 0.0, "max_new_tokens": 16},
        "log": {"run_root": run_root, "progress": False, "tensorboard": False, "samples_per_step": 0},
        "checkpoint": {"every": 0},
        "train": {"steps": 10_000, "lr": 1e-5, "micro_batch_size": 8, "seed": args.seed},
        "algorithm": {"track_kl": False},  # no reference forward: the comparison is about scheduling
        **MODES[mode],
    })


def run_mode(mode: str, args, evaluate_before: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-long-tail-") as tmp:
        cfg = config(mode, args, tmp)
        job = RLJob(cfg, Path(tmp) / "run", LocalRoles)
        try:
            out = {"before": job.evaluate()[job.headline] if evaluate_before else None}
            engine = job.roles.workers[0].engine.stats
            rows0, steps0 = engine.busy_row_steps, engine.steps
            trained = count_trained(job)
            start, records = time.perf_counter(), []
            for _ in range(args.steps):
                records.append(job.train_step()[0])
            wall = time.perf_counter() - start
            out.update(wall=wall, trained=trained(), rows=(engine.busy_row_steps - rows0) / max(1, engine.steps - steps0),
                       long_rounds=sum(r.get("tail/long_round", 0.0) for r in records),
                       deferred=sum(r.get("tail/deferred_prompts", 0.0) for r in records),
                       rollout=sum(r["time/rollout_s"] for r in records) / wall,
                       after=job.evaluate()[job.headline])
            out["s_per_sample"] = out["wall"] / out["trained"]
            logging.info("%s: %d samples in %.0f s; held-out %.3f", mode, out["trained"], wall, out["after"])
            return out
        finally:
            job.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--modes", default="sync,tail,k1")
    parser.add_argument("--steps", type=int, default=5, help="trained steps per mode (4 prompts x 8 samples each)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the reply budget (the tail's length)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_logging()
    torch.manual_seed(args.seed)
    modes = args.modes.split(",")
    results = {mode: run_mode(mode, args, evaluate_before=i == 0) for i, mode in enumerate(modes)}
    base = results[modes[0]]
    print(f"{'mode':<6} {'samples':>7} {'wall s':>7} {'s/sample':>8} {'x ' + modes[0]:>7} {'rows/step':>9} "
          f"{'rollout':>7} {'long':>4} {'deferred':>8} {'held-out':>14}")
    fields = {"heldout_before": round(base["before"], 3)}
    for mode, r in results.items():
        speedup = base["s_per_sample"] / r["s_per_sample"]
        print(f"{mode:<6} {r['trained']:>7} {r['wall']:>7.0f} {r['s_per_sample']:>8.2f} {speedup:>7.2f} {r['rows']:>9.1f} "
              f"{r['rollout']:>7.0%} {r['long_rounds']:>4.0f} {r['deferred']:>8.0f} {base['before']:>6.3f}->{r['after']:<6.3f}")
        fields.update({f"{mode}_s_per_sample": round(r["s_per_sample"], 3), f"{mode}_x_{modes[0]}": round(speedup, 2),
                       f"{mode}_rows_per_step": round(r["rows"], 1), f"{mode}_heldout": round(r["after"], 3)})
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
