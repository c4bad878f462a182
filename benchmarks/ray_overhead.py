"""What running the roles as Ray actors costs: the main job's step time on `runtime.backend: ray`
against `local`, in one run.

Both backends run the packaged main job (GRPO on SmolLM2-135M, 4 prompts x 8 samples) synchronously
for one warm-up step and `--steps` timed steps; the figure is the median step time (rollout, update,
weight sync). Ray's extra work per step is moving the trajectories to the driver and the learner, and
the weights (540 MB) through the object store into the rollout worker.

    .venv/bin/python benchmarks/ray_overhead.py --steps 5

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


def step_times(backend: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-") as tmp:
        cfg = load_run_config(None, [f"runtime.backend={backend}", f"log.run_root={tmp}", "log.progress=false",
                                     "log.tensorboard=false", "eval.before=false", f"train.seed={args.seed}"])
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    fields = {}
    for backend in ("local", "ray"):
        steps = step_times(backend, args)
        med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        every = ", ".join(f"{s['step']:.2f}" for s in steps)
        print(f"{backend:<6} step {med['step']:6.2f} s  (rollout {med['rollout']:.2f}, update {med['train']:.2f}, "
              f"weight sync {med['sync']:.2f}); every step: {every}")
        fields.update({f"{backend}_step_s": round(med["step"], 3), f"{backend}_sync_s": round(med["sync"], 3)})
    fields["ray_over_local"] = round(fields["ray_step_s"] / fields["local_step_s"], 3)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
