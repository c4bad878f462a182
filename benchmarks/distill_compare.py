"""On-policy distillation against SFT on the teacher's replies: the same student, teacher, prompts and steps.

Trains the student of examples/distill_onpolicy.yaml (SmolLM2-135M-Instruct cut to 15 layers) twice from one
teacher folder: with `distill.mode: reverse_kl` (the student samples, the loss is the per-token reverse KL to the
teacher) and with `distill.mode: sft` (NLL of the teacher's sampled replies, the same number per prompt), then
prints the held-out greedy accuracy of both at each eval step and ends with one line
`RESULT key=value ...`.

    python benchmarks/distill_compare.py --teacher runs/teacher-sft/checkpoints/step_000030
    python benchmarks/distill_compare.py --teacher DIR --set model.keep_layers=null --set task.name=add_2digit
    python benchmarks/distill_compare.py --model tiny --steps 2   # a smoke test on random tiny models

Each mode trains in its own `rollmill train` process; `--modes sft` retrains one and reads the other's run
from `--out` as it is.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rollmill.checks import load_run_config
from rollmill.track import read_jsonl

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill_onpolicy.yaml"
MODES = ("reverse_kl", "sft")
# a random tiny student (one of two layers) and a random tiny teacher: checks the plumbing, learns nothing
TINY = ["model.source=tiny", "model.keep_layers=1", "distill.teacher={source: tiny, tiny: {seed: 1}}",
        "task.train_size=32", "task.eval_size=8", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "rollout.sampling.max_new_tokens=4", "eval.max_new_tokens=4", "train.micro_batch_size=4",
        "train.warmup_steps=0"]


def run(mode: str, args, out: Path) -> None:
    """Train one mode into out/mode, in its own `rollmill train` process: the memory of one run's four
    models is freed before the next run loads its own."""
    overrides = [f"distill.mode={mode}", f"train.steps={args.steps}", f"eval.every={args.eval_every}",
                 "checkpoint.every=0", "log.progress=false", "log.trackers=[]", f"name=distill-{mode}"]
    overrides += TINY if args.model == "tiny" else [f"distill.teacher.path={args.teacher}"]
    overrides += args.set
    load_run_config(EXAMPLE, overrides)  # a bad override fails here, before any run starts
    cli = Path(sys.executable).parent / "rollmill"
    subprocess.run([str(cli), "train", str(EXAMPLE), "--run-dir", str(out / mode), "--overwrite",
                    *(f"--set={o}" for o in overrides)], check=True)


def read_run(mode: str, out: Path) -> tuple[list[dict], float]:
    """One mode's eval records and its training seconds (the sum of its steps' times)."""
    records = read_jsonl(out / mode / "metrics.jsonl")
    seconds = sum(r.get("time/step_s", 0.0) for r in records)
    return [r for r in records if "eval/accuracy" in r], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--teacher", help="the teacher's transformers folder (smollm2; e.g. an SFT checkpoint)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default="runs/distill-compare", help="the two runs go in OUT/reverse_kl, OUT/sft")
    parser.add_argument("--modes", default=",".join(MODES), help="the modes to train now; the others' runs are "
                        "read from OUT as an earlier call left them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the example's config in both runs, e.g. model.keep_layers=null")
    args = parser.parse_args()
    if args.model == "smollm2" and not args.teacher:
        parser.error("--teacher is required with --model smollm2 (make one: rollmill train "
                     "examples/sft_arithmetic.yaml --run-dir runs/teacher-sft)")
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
        run(mode, args, Path(args.out))
    results = {mode: read_run(mode, Path(args.out)) for mode in MODES}
    evals = {mode: {r["step"]: r for r in records} for mode, (records, _) in results.items()}
    print(f"{'step':>5} " + " ".join(f"{mode + ' acc':>14}" for mode in MODES))
    for step in sorted(set.union(*(set(e) for e in evals.values()))):
        print(f"{step:>5} " + " ".join(f"{evals[mode].get(step, {}).get('eval/accuracy', float('nan')):>14.3f}"
                                      for mode in MODES))
    fields = {"model": args.model, "task": load_run_config(EXAMPLE, args.set).task.name, "steps": args.steps}
    for mode, (records, seconds) in results.items():
        fields |= {f"{mode}_initial": f"{records[0]['eval/accuracy']:.3f}",
                   f"{mode}_final": f"{records[-1]['eval/accuracy']:.3f}",
                   f"{mode}_best": f"{max(r['eval/accuracy'] for r in records):.3f}",
                   f"{mode}_kl_final": f"{records[-1]['eval/kl']:.4f}", f"{mode}_train_s": f"{seconds:.0f}"}
    fields["teacher_accuracy"] = f"{results['sft'][0][-1]['eval/teacher_accuracy']:.3f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
