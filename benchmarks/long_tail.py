"""Tail batching against synchronous and asynchronous training, in one run, on SmolLM2-135M.

The workload has a heavy-tailed reply length: "which number is larger?" with a 256-token budget,
where SmolLM2's replies run from 2 tokens to the cap (median ~40). Each mode trains the same number
of steps (so the same number of samples) from the same weights:

- `sync`: max_staleness 0, every step waits for its slowest reply (the baseline);
- `tail`: synchronous, with tail batching (short rounds over-provision prompts and samples and
  train what finishes first; the cut-off prompts train together in long rounds);
- `k1`: max_staleness 1 with rollout yielding the cores to the learner (the best async setting on a
  machine where both share the cores; see benchmarks/async.py);
- `tail_wide`: tail batching with both factors 1.5 (more over-provisioning: fuller short rounds,
  more deferred prompts, a stronger pull towards short replies within a group);
- `tail_streamed`: tail batching with streamed training (the learner runs each group's forward and
  backward as it completes, while the round's other groups are still sampled);
- `tail_s15`, `tail_s15_streamed`: sample factor 1.5 (the first 8 of 12 replies kept; the
  setting the simulator picked for this machine), without and with streamed training;
- `both`: tail batching with max_staleness 1 (and rollout yielding).

For each: wall time per trained sample and its ratio to sync, the engine's mean rows per decode step
and its occupancy (rows decoded over the row slots offered: the tail runs a few rows at a time), the
long rounds and deferred prompts, and held-out accuracy after the same number of trained samples.
`--record FILE` also writes what the scheduling simulator (benchmarks/simulate.py) is calibrated
from: the sync mode's reply lengths per group, the engine's step time by rows decoded, each update's
time, and each mode's measured step time.

    .venv/bin/python benchmarks/long_tail.py --record long_tail.json   # 5 steps per mode (~35 min here)
    .venv/bin/python benchmarks/long_tail.py --steps 3 --modes sync,tail

Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from runs import quiet_logging, time_updates

from rollmill.config import config_from_dict
from rollmill.runtime.local import LocalRoles
from rollmill.runtime.rl import RLJob

MODES = {
    "sync": {},
    "tail": {"tail_batching": {"enabled": True}},
    "k1": {"async": {"max_staleness": 1}, "runtime": {"rollout_yields": True}},
    "tail_wide": {"tail_batching": {"enabled": True, "prompt_factor": 1.5, "sample_factor": 1.5}},
    "tail_streamed": {"tail_batching": {"enabled": True}, "runtime": {"streamed_training": True}},
    "tail_s15": {"tail_batching": {"enabled": True, "sample_factor": 1.5}},
    "tail_s15_streamed": {"tail_batching": {"enabled": True, "sample_factor": 1.5}, "runtime": {"streamed_training": True}},
    "both": {"tail_batching": {"enabled": True}, "async": {"max_staleness": 1}, "runtime": {"rollout_yields": True}},
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
        "log": {"run_root": run_root, "progress": False, "trackers": [], "samples_per_step": 0},
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
            engine = job.roles.workers[0].engine
            load0 = job.roles.engine_load()
            updates = time_updates(job)
            start, records = time.perf_counter(), []
            for _ in range(args.steps):
                records.append(job.train_step()[0])
            wall = time.perf_counter() - start
            load = {k: v - load0[k] for k, v in job.roles.engine_load().items()}
            out.update(wall=wall, trained=sum(u["samples"] for u in updates), rows=load["rows"] / max(1, load["steps"]),
                       occupancy=load["rows"] / max(1, load["slots"]),
                       long_rounds=sum(r.get("tail/long_round", 0.0) for r in records),
                       deferred=sum(r.get("tail/deferred_prompts", 0.0) for r in records),
                       rollout=sum(r["time/rollout_s"] for r in records) / wall,
                       after=job.evaluate()[job.headline], updates=updates,
                       sync_s=[r["time/sync_s"] for r in records], settings=_settings(cfg),
                       engine=engine.stats, batch_size=engine.batch_size)
            out["s_per_sample"] = out["wall"] / out["trained"]
            logging.info("%s: %d samples in %.0f s; held-out %.3f", mode, out["trained"], wall, out["after"])
            return out
        finally:
            job.close()


def _settings(cfg) -> dict:
    tb = cfg.tail_batching
    return {"max_staleness": cfg.async_.max_staleness, "tail_batching": tb.enabled, "prompt_factor": tb.prompt_factor,
            "sample_factor": tb.sample_factor, "rollout_yields": cfg.runtime.rollout_yields,
            "streamed_training": cfg.runtime.streamed_training}


def record(results: dict, args, path: str) -> None:
    """What benchmarks/simulate.py fits its model to and compares its predictions with."""
    runs = list(results.values())
    by_rows: dict[int, list] = {}
    # the step-time curve and the update times from modes where rollout and update take turns
    # (synchronous, not streamed): overlapped modes would fold contention into both
    alone = [r for r in runs if r["settings"]["max_staleness"] == 0 and not r["settings"]["streamed_training"]] or runs
    for r in alone:
        for rows, (steps, seconds) in r["engine"].by_rows.items():
            entry = by_rows.setdefault(rows, [0, 0.0])
            entry[0] += steps
            entry[1] += seconds
    prefill_s = sum(r["engine"].prefill_s for r in alone)
    prefill_tokens = sum(r["engine"].prefill_tokens for r in alone)
    base = results.get("sync", runs[0])
    groups = [g for u in base["updates"] for g in u["lengths"]]
    prompts = [n for u in base["updates"] for n in u["prompt_tokens"]]
    sync_s = [s for r in runs for s in r["sync_s"]]
    data = {
        "workload": {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": args.max_new_tokens,
                     "prompt_tokens_mean": sum(prompts) / max(1, len(prompts)),
                     "engines": 1, "engine_batch_size": base["batch_size"], "cores": os.cpu_count()},
        "groups": groups,
        "decode_step_s": [[rows, steps, seconds] for rows, (steps, seconds) in sorted(by_rows.items())],
        "prefill_s_per_token": prefill_s / max(1, prefill_tokens),
        "train": [[u["samples"], u["tokens"], u["seconds"]] for r in alone for u in r["updates"]],
        "sync_s": sum(sync_s) / max(1, len(sync_s)),
        "modes": {mode: {"settings": r["settings"], "steps": args.steps, "s_per_step": r["wall"] / args.steps,
                         "s_per_trained_sample": r["s_per_sample"], "rows_per_decode_step": r["rows"]}
                  for mode, r in results.items()},
    }
    Path(path).write_text(json.dumps(data))
    logging.info("recorded the measurements for benchmarks/simulate.py in %s", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--modes", default="sync,tail,tail_wide,tail_streamed,k1,both")
    parser.add_argument("--steps", type=int, default=5, help="trained steps per mode (4 prompts x 8 samples each)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the reply budget (the tail's length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", metavar="FILE", help="write the measurements benchmarks/simulate.py calibrates from")
    args = parser.parse_args()
    quiet_logging()
    torch.manual_seed(args.seed)
    modes = args.modes.split(",")
    results = {mode: run_mode(mode, args, evaluate_before=i == 0) for i, mode in enumerate(modes)}
    base = results[modes[0]]
    if args.record:
        record(results, args, args.record)
    print(f"{'mode':<13} {'samples':>7} {'wall s':>7} {'s/sample':>8} {'x ' + modes[0]:>7} {'rows/step':>9} "
          f"{'occupancy':>9} {'rollout':>7} {'long':>4} {'deferred':>8} {'held-out':>14}")
    fields = {"heldout_before": round(base["before"], 3)}
    for mode, r in results.items():
        speedup = base["s_per_sample"] / r["s_per_sample"]
        print(f"{mode:<13} {r['trained']:>7} {r['wall']:>7.0f} {r['s_per_sample']:>8.2f} {speedup:>7.2f} {r['rows']:>9.1f} "
              f"{r['occupancy']:>9.1%} {r['rollout']:>7.0%} {r['long_rounds']:>4.0f} {r['deferred']:>8.0f} {base['before']:>6.3f}->{r['after']:<6.3f}")
        fields.update({f"{mode}_s_per_sample": round(r["s_per_sample"], 3), f"{mode}_x_{modes[0]}": round(speedup, 2),
                       f"{mode}_rows_per_step": round(r["rows"], 1),
                       f"{mode}_occupancy": round(r["occupancy"], 3), f"{mode}_heldout": round(r["after"], 3)})
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
