"""The scheduling simulator (rollmill.simulate, docs/simulator.md): predicted against measured on one
machine, then predictions at cluster scale.

With `--measured RECORD.json` (written by `benchmarks/long_tail.py --record`) it fits the latency
model to the record, simulates each measured mode with its settings on the measured workload (one
engine, engines and learner sharing the cores, the recorded groups of reply lengths) and prints
predicted against measured seconds per step with their ratio. Then, with or without a record, the
cluster table: seconds per trained sample and engine occupancy for sync, async k = 1, tail batching
and both, at 8, 64 and 512 engines, for a RollPacker-like and a ROLL-Flash-like length distribution,
with assumed GPU-like latencies (`assumed_gpu_latency`; the docs say what is assumed).

    .venv/bin/python benchmarks/simulate.py                           # the cluster table (3-5 min)
    .venv/bin/python benchmarks/simulate.py --measured record.json    # calibration first

Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rollmill.simulate import (
    EmpiricalLengths,
    LogNormalLengths,
    Policy,
    Workload,
    assumed_gpu_latency,
    average,
    fit_latency,
    policy_from_settings,
    simulate,
    workload_from_record,
)

# Assumed length distributions (docs/simulator.md, "Length distributions"): the papers' only number we
# found is that the longest replies run past 20x the median; shapes, medians and caps are our choices.
DISTRIBUTIONS = {
    "rollpacker": LogNormalLengths(median=400, p99=8000, cap=8192),
    "rollflash": LogNormalLengths(median=1000, p99=20000, cap=32768),
}
POLICIES = {"sync": Policy("sync"), "k1": Policy("async", k=1), "tail": Policy("tail"), "both": Policy("both")}
GROUP_SIZE, PROMPTS_PER_ENGINE, BATCH, PROMPT_TOKENS = 16, 8, 128, 512


def calibrate(record: dict, seeds: int) -> dict:
    latency, workload = fit_latency(record), workload_from_record(record)
    lengths = EmpiricalLengths(tuple(tuple(g) for g in record["groups"]))
    per = "sample" if latency.train_per_sample else "token"
    print(f"fitted: decode {latency.decode_a * 1e3:.1f} ms + {latency.decode_b * 1e3:.2f} ms/row; prefill "
          f"{latency.prefill_s_per_token * 1e3:.2f} ms/token; update {latency.train_c0:.1f} s + "
          f"{latency.train_c1 * 1e3:.2f} ms/{per}; sync {latency.sync_s:.2f} s; contention {latency.contention} (set)")
    print(f"{'mode':<13} {'policy':<16} {'steps':>5} {'measured s/step':>15} {'predicted':>9} {'ratio':>6} "
          f"{'rows/step meas':>14} {'pred':>5} {'long/deferred':>13}")
    fields = {}
    for mode, m in record["modes"].items():
        policy = policy_from_settings(m["settings"])
        r = average([simulate(workload, latency, lengths, policy, steps=m["steps"], seed=s) for s in range(seeds)])
        ratio = r.step_s / m["s_per_step"]
        label = f"{policy.name}{policy.k if policy.name == 'async' else ''}{' yields' if policy.rollout_yields else ''}"
        if m["settings"].get("streamed_training"):
            label += " *"  # streamed training is not modelled: simulated as the plain schedule
        print(f"{mode:<13} {label:<16} {m['steps']:>5} {m['s_per_step']:>15.1f} {r.step_s:>9.1f} {ratio:>6.2f} "
              f"{m.get('rows_per_decode_step', float('nan')):>14.1f} {r.rows_per_step:>5.1f} "
              f"{r.long_rounds:>6.1f}/{r.deferred:<6.1f}")
        fields[f"calib_{mode}_ratio"] = round(ratio, 2)
    if any(m["settings"].get("streamed_training") for m in record["modes"].values()):
        print("* streamed training is not modelled: the mode is simulated without it")
    return fields


def cluster(engine_counts: list[int], steps: int, warmup: int) -> dict:
    print(f"\ncluster: P = {PROMPTS_PER_ENGINE} x engines prompts x G = {GROUP_SIZE}, {BATCH} rows per engine, "
          f"{PROMPT_TOKENS}-token prompts, assumed GPU-like latencies; steps {warmup + 1}-{steps}, "
          f"averaged over 64 / engines seeds")
    print(f"{'engines':>7} {'lengths':<10} {'policy':<6} {'ms/sample':>9} {'x sync':>6} {'occupancy':>9} "
          f"{'learner idle':>12} {'stale groups':>12} {'long/deferred':>13}")
    fields = {}
    for name, lengths in DISTRIBUTIONS.items():
        for engines in engine_counts:
            workload = Workload(prompts=PROMPTS_PER_ENGINE * engines, group_size=GROUP_SIZE, engines=engines,
                                engine_batch_size=BATCH, prompt_tokens=PROMPT_TOKENS)
            latency = assumed_gpu_latency(engines)
            seeds = max(1, 64 // engines)  # small clusters: average runs so each figure covers 64 engines' worth
            base = None
            for label, policy in POLICIES.items():
                r = average([simulate(workload, latency, lengths, policy, steps=steps, warmup=warmup, seed=seed)
                             for seed in range(seeds)])
                base = base or r
                speedup = base.s_per_sample / r.s_per_sample
                print(f"{engines:>7} {name:<10} {label:<6} {r.s_per_sample * 1e3:>9.2f} {speedup:>6.2f} "
                      f"{r.occupancy:>9.1%} {r.learner_idle:>12.1%} {r.stale:>12.0f} "
                      f"{r.long_rounds:>6.0f}/{r.deferred:<6.0f}", flush=True)
                if label != "sync":
                    fields[f"e{engines}_{name}_{label}_x_sync"] = round(speedup, 2)
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", help="a record of benchmarks/long_tail.py --record")
    parser.add_argument("--seeds", type=int, default=20, help="calibration: runs averaged per mode")
    parser.add_argument("--engines", default="8,64,512", help="cluster sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=15, help="cluster: simulated updates (tail cycles are 5 long)")
    parser.add_argument("--warmup", type=int, default=5, help="cluster: updates left out of the figures")
    args = parser.parse_args()
    fields = calibrate(json.loads(Path(args.measured).read_text()), args.seeds) if args.measured else {}
    fields |= cluster([int(e) for e in args.engines.split(",")], args.steps, args.warmup)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
