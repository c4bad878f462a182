"""What running the roles as Ray actors costs: the main job's step time on `runtime.backend: ray`
against `local`, in one run.

Both backends run the packaged main job (GRPO on SmolLM2-135M, 4 prompts x 8 samples) synchronously
for one warm-up step and `--steps` timed steps; the figure is the median step time (rollout, update,
weight sync). Ray's extra work per step is moving the trajectories to the driver and the learner, and
the weights (540 MB) through the object store into the rollout worker.

    .venv/bin/python benchmarks/ray_overhead.py --steps 5 [--lora 16]

`--lora R` adds a third run on Ray with LoRA adapters of rank R (every linear layer): its weight sync
sends the merged adapted layers only, so the figure to compare is its sync time against the full run's.

Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from rollmill.checks import load_run_config
from rollmill.runtime.local import LocalRoles
from rollmill.runtime.rl import RLJob


def step_times(backend: str, args, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-") as tmp:
        cfg = load_run_config(None, [f"runtime.backend={backend}", f"log.run_root={tmp}", "log.progress=false",
                                     "log.trackers=[]", "eval.before=false", f"train.seed={args.seed}", *extra])
        if backend == "ray":
            from rollmill.runtime.ray import RayRoles

            roles = RayRoles
        else:
            roles = LocalRoles
        job = RLJob(cfg, Path(tmp) / "run", roles)
        try:
            out = []
            for _ in range(args.steps + 1):
                t0 = time.perf_counter()
                record, _ = job.train_step()
                out.append({"step": time.perf_counter() - t0, "rollout": record["time/rollout_s"],
                            "train": record["time/train_s"], "sync": record["time/sync_s"]})
            return out[1:]  # the first step warms up allocators and kernels
        finally:
            job.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0, help="also time a Ray run with LoRA adapters of this rank")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    fields = {}
    runs = [("local", "local", []), ("ray", "ray", [])]
    if args.lora:
        runs.append(("ray_lora", "ray", [f"model.lora.rank={args.lora}", "train.lr=1e-4"]))
    for name, backend, extra in runs:
        steps = step_times(backend, args, extra)
        med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        every = ", ".join(f"{s['step']:.2f}" for s in steps)
        print(f"{name:<8} step {med['step']:6.2f} s  (rollout {med['rollout']:.2f}, update {med['train']:.2f}, "
              f"weight sync {med['sync']:.2f}); every step: {every}")
        fields.update({f"{name}_step_s": round(med["step"], 3), f"{name}_sync_s": round(med["sync"], 3)})
    fields["ray_over_local"] = round(fields["ray_step_s"] / fields["local_step_s"], 3)
    if args.lora:
        fields["lora_sync_over_full"] = round(fields["ray_lora_sync_s"] / fields["ray_sync_s"], 3)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
