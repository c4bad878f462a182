"""SFT, GRPO, and SFT then GRPO on one task, each for the same training time: which ends higher?

Three arms train SmolLM2-135M-Instruct (fp32, CPU) on one arithmetic task, each for `--budget-s` of
training time (evaluation excluded):
- `sft`: supervised fine-tuning on the task's verified answers (the assistant reply is the answer);
- `grpo`: the main job's GRPO (4 prompts x 8 samples, 12 new tokens, lr 1e-5, first_integer reward);
- `sft_then_grpo`: SFT for `--sft-share` of the budget, then GRPO from that SFT checkpoint (an
  HF-loadable folder, loaded as `model.source: hf_dir`) for the rest.
SFT uses `examples/sft_arithmetic.yaml`'s settings (16 examples per step, lr 5e-5, constant rate here,
since a cosine schedule would need a step count the time budget does not fix).

One evaluator scores every arm: greedy `transformers.generate` on the task's held-out questions
(`benchmarks/recipes.py`'s `accuracy`), about every `--eval-every-s` seconds of training.
The arms run at once, one core and one thread each, timed by process CPU time (as
`recipes.py --parallel` does); `--parallel 1` runs them one after another on `--threads` threads,
timed by wall-clock. Results: `results.jsonl`, `<task>.png` (accuracy against training time) in `--out`.

With `--demos N` the SFT stages learn from only the first N training questions' answers while GRPO
draws from all 2000: the case the two-stage recipe is for, where verified demonstrations are few and
prompts a verifier can score are many.

Run: python benchmarks/sft_then_rl.py [--task add_2digit] [--budget-s 600] [--sft-share 0.5] [--seed 0]
        [--demos 2000] [--eval-size 96] [--eval-every-s 60] [--parallel 3] [--model smollm2|tiny] [--out DIR]
Last line: `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import ROOT, accuracy  # noqa: E402  (the study's evaluator, so the figures compare)

ARMS = ("sft", "grpo", "sft_then_grpo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="add_2digit")
    p.add_argument("--budget-s", type=float, default=600.0, help="training seconds per arm (evaluation excluded)")
    p.add_argument("--sft-share", type=float, default=0.5, help="sft_then_grpo: the share of the budget spent on SFT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demos", type=int, default=2000, help="verified demonstrations the SFT stages learn from "
                   "(the first N training questions); GRPO draws from all 2000 training questions")
    p.add_argument("--eval-size", type=int, default=96, help="held-out questions each evaluation scores")
    p.add_argument("--eval-every-s", type=float, default=60.0, help="training seconds between evaluations")
    p.add_argument("--parallel", type=int, default=3, help="arms at once (one thread each; pinned to a core each "
                   "when there are enough cores)")
    p.add_argument("--threads", type=int, default=2, help="torch threads with --parallel 1")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--out", default=str(ROOT / "runs" / "sft_then_rl"))
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.demos <= 2000:
        p.error(f"--demos {args.demos}: give 1 to 2000 (the training questions)")
    if not 0.0 < args.sft_share < 1.0:
        p.error(f"--sft-share {args.sft_share}: give a share strictly between 0 and 1")
    if args.parallel > 1:
        args.threads = 1
    args.clock = "wall" if args.parallel == 1 else "cpu"
    return args


def sections(args, model: dict, train_size: int = 2000) -> dict:
    """The config both stages share: model, task, reward, and where runs go. The arithmetic tasks hold their
    eval questions out before drawing the training ones, so `train_size` leaves the eval split as it is."""
    return {
        "model": model,
        "task": {"source": "arithmetic", "name": args.task, "train_size": train_size, "eval_size": args.eval_size,
                 "instruction": "Answer with just the number."},
        "reward": {"functions": [{"name": "first_integer"}]},
        "eval": {"before": False},
        "log": {"trackers": [], "progress": False, "samples_per_step": 0},
    }


def sft_config(args, model: dict, run_root: str):
    from rollmill.config import config_from_dict

    cfg = sections(args, model, train_size=args.demos)
    cfg["log"]["run_root"] = run_root
    return config_from_dict({**cfg, "pipeline": "sft",
                             "sft": {"examples_per_step": 16, "pack": True, "max_seq_len": 512},
                             "train": {"lr": 5e-5, "steps": 100_000, "max_grad_norm": 1.0, "micro_batch_size": 4,
                                       "seed": args.seed}})


def grpo_config(args, model: dict, run_root: str):
    from rollmill.config import config_from_dict

    cfg = sections(args, model)
    cfg["log"]["run_root"] = run_root
    return config_from_dict({**cfg, "rollout": {"prompts_per_step": 4, "group_size": 8, "logprob_check": "off",
                                                "sampling": {"max_new_tokens": 12, "temperature": 1.0}},
                             "algorithm": {"name": "grpo", "loss_agg": "token-mean", "kl_coef": 0.0, "track_kl": False},
                             "train": {"lr": 1e-5, "steps": 100_000, "max_grad_norm": 1.0, "micro_batch_size": 8,
                                       "seed": args.seed}})


class Curve:
    """Trains a job until a training-time mark, evaluating about every `eval_every_s` seconds."""

    def __init__(self, args, examples, tokenizer, task_cfg):
        self.args, self.examples, self.tokenizer, self.task_cfg = args, examples, tokenizer, task_cfg
        self.now = time.perf_counter if args.clock == "wall" else time.process_time
        self.trained, self.steps, self.points, self.next_eval = 0.0, 0, [], 0.0

    def evaluate(self, model, stage: str) -> None:
        acc = accuracy(model, self.tokenizer, self.examples, self.task_cfg)
        self.points.append({"train_s": self.trained, "steps": self.steps, "stage": stage, "accuracy": acc})
        self.next_eval = self.trained + self.args.eval_every_s
        print(f"  {self.args.child} {stage}: {self.steps} steps {self.trained:.0f}s acc {acc:.3f}", flush=True)

    def train(self, job, model, stage: str, until_s: float) -> None:
        while self.trained < until_s:
            t0 = self.now()
            job.train_step()
            self.trained += self.now() - t0
            self.steps += 1
            if self.trained >= self.next_eval or self.trained >= until_s:
                self.evaluate(model, stage)


def run_arm(args) -> list[dict]:
    from rollmill.models import load_tokenizer
    from rollmill.runtime.local import LocalRoles
    from rollmill.runtime.rl import RLJob
    from rollmill.runtime.sft import SFTJob
    from rollmill.tasks import load_task

    base = {"source": args.model}
    with tempfile.TemporaryDirectory(prefix="sft-then-rl-") as tmp:
        probe = grpo_config(args, base, tmp)
        curve = Curve(args, load_task(probe.task)[1], load_tokenizer(probe.model), probe.task)
        sft_until = args.budget_s * (1.0 if args.child == "sft" else args.sft_share)
        model_for_rl = base
        if args.child in ("sft", "sft_then_grpo"):
            job = SFTJob(sft_config(args, base, tmp), Path(tmp) / "sft")
            curve.evaluate(job.learner.model, "sft")
            curve.train(job, job.learner.model, "sft", sft_until)
            model_for_rl = {"source": "hf_dir", "path": str(job.save({}))}
            job.close()
        if args.child in ("grpo", "sft_then_grpo"):
            job = RLJob(grpo_config(args, model_for_rl, tmp), Path(tmp) / "grpo", LocalRoles)
            if not curve.points:
                curve.evaluate(job.roles.learner.model, "grpo")
            curve.train(job, job.roles.learner.model, "grpo", args.budget_s)
            job.close()
    return curve.points


def run_child(args) -> int:
    import torch

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(args.threads)
    points = run_arm(args)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps({"arm": args.child, "task": args.task, "seed": args.seed, "budget_s": args.budget_s,
                            "sft_share": args.sft_share, "demos": args.demos, "eval_size": args.eval_size,
                            "model": args.model, "clock": args.clock,
                            "curve": points}) + "\n")
    return 0


def plot(rows: list[dict], out: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.step([p["train_s"] for p in row["curve"]], [p["accuracy"] for p in row["curve"]], where="post",
                label=row["arm"], marker="o", markersize=3)
    switch = rows[0]["budget_s"] * rows[0]["sft_share"]
    ax.axvline(switch, color="grey", linewidth=0.6, linestyle=":")
    ax.set(title=f"{task}: greedy held-out accuracy (SFT -> GRPO switch dotted)",
           xlabel="training time (s, evaluation excluded)", ylabel="accuracy", ylim=(0, 1))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{task}.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    common = ["--task", args.task, "--budget-s", str(args.budget_s), "--sft-share", str(args.sft_share),
              "--seed", str(args.seed), "--demos", str(args.demos), "--eval-size", str(args.eval_size),
              "--eval-every-s", str(args.eval_every_s), "--parallel", str(args.parallel),
              "--threads", str(args.threads), "--model", args.model, "--out", str(out)]
    pending, running = list(ARMS), []
    while pending or running:
        while pending and len(running) < args.parallel:
            arm, cpu = pending.pop(0), len(running) % (os.cpu_count() or 1)
            # more runs than cores: left unpinned, so the scheduler keeps every core busy (CPU time stays fair)
            pin = ["--cpu", str(cpu)] if 1 < args.parallel <= (os.cpu_count() or 1) else []
            running.append(subprocess.Popen([sys.executable, __file__, "--child", arm, *common, *pin], env=env))
        if args.parallel == 1:
            running[0].wait()
        else:
            time.sleep(1)
        running = [p for p in running if p.poll() is None]
    same = {"task": args.task, "seed": args.seed, "budget_s": args.budget_s, "model": args.model, "clock": args.clock,
            "demos": args.demos, "eval_size": args.eval_size}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # rows from before --demos/--eval-size existed used every training question and 96 eval questions
    latest = {r["arm"]: r for r in rows if all(r.get(k, {"demos": 2000, "eval_size": 96}.get(k)) == v
                                               for k, v in same.items())}
    if set(latest) != set(ARMS):
        print(f"missing arms: {sorted(set(ARMS) - set(latest))}")
        return 1
    plot([latest[a] for a in ARMS], out, args.task if args.demos == 2000 else f"{args.task}_demos{args.demos}")
    finals = {a: latest[a]["curve"][-1]["accuracy"] for a in ARMS}
    for arm in ARMS:
        print(f"{arm:14s} start {latest[arm]['curve'][0]['accuracy']:.3f} final {finals[arm]:.3f} "
              f"({latest[arm]['curve'][-1]['steps']} steps)")
    best_alone = max(finals["sft"], finals["grpo"])
    print(f"plot in {out}")
    print(f"RESULT task={args.task} budget_s={args.budget_s:.0f} demos={args.demos} eval_size={args.eval_size} sft={finals['sft']:.3f} grpo={finals['grpo']:.3f} "
          f"sft_then_grpo={finals['sft_then_grpo']:.3f} lift_over_best_alone={finals['sft_then_grpo'] - best_alone:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
