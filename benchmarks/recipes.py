"""Recipe study: which RL recipe learns fastest here, per second of training, and rollmill vs TRL.

Every run trains SmolLM2-135M-Instruct (fp32, CPU) on one arithmetic task with the main job's
workload: 4 prompts x 8 samples per step, up to 12 new tokens at temperature 1.0, lr 1e-5, reward 1
when the first integer of the reply is the answer, no KL, the task's seed-0 split. A run stops once
its *training* time (rollout + update; evaluation excluded) reaches `--budget-s`.

Clocks. With `--parallel 1` (default) one run at a time uses `--threads` (default 2) torch threads and
training time is wall-clock. With `--parallel N` N runs go at once, each pinned to its own core with
one thread, and training time is the run's process CPU time: on an otherwise idle core that equals
its wall-clock, and it stays fair to every run when the machine is shared, which wall-clock does not.

Recipes are rollmill's presets as `examples/presets/<name>.yaml` writes them (algorithm and filters
sections; e.g. DAPO's dynamic sampling): grpo, dr_grpo, dapo, lite_ppo, gspo, cispo, rloo,
reinforce_pp_baseline. The baseline is TRL's `GRPOTrainer` with its own defaults for everything
but the workload (model, prompts and their order, group size, batch, completion length,
temperature, lr, beta 0, seed) and gradient checkpointing, which rollmill does not do either.

Both frameworks are scored by the same evaluator: greedy decoding with `transformers.generate` on
the task's 96 held-out questions, encoded as rollmill encodes them, every `--eval-every` steps and at
the end. Time to 0.8 is the training time at the first evaluation at or above 0.8 held-out accuracy.
TRL's steps are slower, so its runs may need a longer budget (`--trl-budget-s`) and denser evaluations
(`--trl-eval-every`) to show when they get there; a TRL run that never does bounds the speed-up from below.

Each run is a child process (this script with `--child`); results accumulate in `--out`
(results.jsonl, one line per run, so an interrupted study resumes where it stopped), which also
gets `<task>.png` (accuracy against training time, mean over seeds and the min-max band) and
table.md. This is laptop scale: 2 seeds and minutes per run, not the many seeds and hours of the
studies it imitates; read the spreads before the means.

Run: python benchmarks/recipes.py [--tasks larger_of_two,add_2digit] [--recipes grpo,...]
        [--seeds 0,1] [--budget-s 300] [--eval-every 5] [--no-trl] [--model smollm2|tiny] [--out DIR]
        [--parallel N] [--threads T] [--trl-budget-s S] [--trl-eval-every K] [--report]
`--model tiny --budget-s 10 --recipes grpo --tasks larger_of_two --seeds 0` smoke-tests the script.
Last line: `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("grpo", "dr_grpo", "dapo", "lite_ppo", "gspo", "cispo", "rloo", "reinforce_pp_baseline")
TARGET = 0.8
PROMPTS, GROUP, NEW_TOKENS, LR = 4, 8, 12, 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="larger_of_two,add_2digit")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per run (evaluation excluded)")
    p.add_argument("--trl-budget-s", type=float, help="the TRL runs' budget, when they need longer to reach the "
                   "target (default: --budget-s)")
    p.add_argument("--eval-every", type=int, default=5, help="steps between held-out evaluations")
    p.add_argument("--at-step", type=int, default=30, help="the table's per-step column: accuracy at this step "
                   "(runs sharing the machine do not get the same steps from the same CPU time)")
    p.add_argument("--trl-eval-every", type=int, help="the TRL runs' (default: --eval-every); TRL's steps take "
                   "longer, so fewer steps between evaluations keep time to target as fine-grained")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL GRPOTrainer baseline")
    p.add_argument("--report", action="store_true", help="run nothing: the table, plots and RESULT of what --out holds")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--out", default=str(ROOT / "runs" / "recipes"))
    p.add_argument("--parallel", type=int, default=1, help="runs at once, one core and one thread each (CPU-time clock)")
    p.add_argument("--threads", type=int, help="torch threads per run (default 2; 1 with --parallel > 1)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "framework:recipe:task:seed", run in this process
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)  # the core a parallel child is pinned to
    args = p.parse_args(argv)
    if args.parallel < 1 or args.parallel > (os.cpu_count() or 1):
        p.error(f"--parallel {args.parallel}: choose 1 to {os.cpu_count()} (one core per run)")
    if args.threads is None:
        args.threads = 2 if args.parallel == 1 else 1
    if args.parallel > 1 and args.threads != 1:
        p.error("--parallel > 1 runs one thread per run (its CPU time is its clock): drop --threads")
    args.clock = "wall" if args.parallel == 1 else "cpu"
    if args.trl_budget_s is None:
        args.trl_budget_s = args.budget_s
    if args.trl_eval_every is None:
        args.trl_eval_every = args.eval_every
    args.recipes = [r for r in args.recipes.split(",") if r]  # "" runs TRL alone
    unknown = set(args.recipes) - set(RECIPES)
    if unknown:
        p.error(f"unknown recipes {sorted(unknown)}; choose from {list(RECIPES)}")
    return args


def run_config(args, recipe: str, task: str, seed: int, run_root: str):
    from rollmill.config import config_from_dict

    preset = yaml.safe_load((ROOT / "examples" / "presets" / f"{recipe}.yaml").read_text())
    sections = {
        "model": {"source": args.model},
        "task": {"source": "arithmetic", "name": task, "instruction": "Answer with just the number."},
        "reward": {"functions": [{"name": "first_integer"}]},
        "rollout": {"prompts_per_step": PROMPTS, "group_size": GROUP, "logprob_check": "off",
                    "sampling": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0}},
        "algorithm": {**preset["algorithm"], "kl_coef": 0.0, "track_kl": False},
        "filters": preset.get("filters", {}),
        "train": {"lr": LR, "steps": 100_000, "micro_batch_size": 8, "seed": seed},
        "eval": {"before": False},
        "log": {"run_root": run_root, "trackers": [], "progress": False, "samples_per_step": 0},
    }
    return config_from_dict(sections)


def held_out(cfg):
    from rollmill.tasks import load_task

    return load_task(cfg.task)[1]


def accuracy(model, tokenizer, examples, task_cfg, batch: int = 32) -> float:
    """Greedy held-out accuracy with plain `transformers.generate`, the same for every framework."""
    import torch

    from rollmill.pipelines.common import encode_prompt
    from rollmill.rewards.functions import first_integer

    was_training, model.training = model.training, False
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            ids = [encode_prompt(tokenizer, e, task_cfg) for e in chunk]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            correct += sum(first_integer(t, e) >= 1.0 for t, e in zip(texts, chunk))
    model.train(was_training)
    return correct / len(examples)


def clock(args):
    """The training-time clock: wall-clock, or the process's CPU time when runs share the machine."""
    return time.perf_counter if args.clock == "wall" else time.process_time


def train_rollmill(args, recipe: str, task: str, seed: int) -> list[dict]:
    import tempfile

    from rollmill.models import load_tokenizer
    from rollmill.runtime.local import LocalRoles
    from rollmill.runtime.rl import RLJob

    with tempfile.TemporaryDirectory(prefix="recipes-") as tmp:
        cfg = run_config(args, recipe, task, seed, tmp)
        examples, tokenizer = held_out(cfg), load_tokenizer(cfg.model)
        job = RLJob(cfg, Path(tmp) / "run", LocalRoles)
        model = job.roles.learner.model
        curve, trained, step = [{"step": 0, "train_s": 0.0, "accuracy": accuracy(model, tokenizer, examples, cfg.task)}], 0.0, 0
        now = clock(args)
        while trained < args.budget_s:
            t0 = now()
            job.train_step()
            trained, step = trained + now() - t0, step + 1
            if step % args.eval_every == 0 or trained >= args.budget_s:
                curve.append({"step": step, "train_s": trained, "accuracy": accuracy(model, tokenizer, examples, cfg.task)})
                print(f"  {recipe} {task} seed {seed}: step {step} {trained:.0f}s acc {curve[-1]['accuracy']:.3f}",
                      flush=True)
        job.close()
    return curve


def train_trl(args, task: str, seed: int) -> list[dict]:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollmill.pipelines.common import PromptCursor
    from rollmill.tasks import load_task

    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_step import first_integer_reward, model_dir

    cfg = run_config(args, "grpo", task, seed, "unused")
    train, examples = load_task(cfg.task)
    # the training examples rollmill's pipeline takes, in its order, for many more steps than fit the budget
    order = PromptCursor(len(train), seed=cfg.task.seed + cfg.train.seed).take(4000 * PROMPTS)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": train[i].prompt}], "answer": train[i].answer}
                              for i in order])

    now = clock(args)

    class Budget(TrainerCallback):
        """Times everything from one step's end to the next but evaluation; evaluates every eval_every steps.

        Timing between step ends, not from on_step_begin, also counts the batch fetch the Trainer does
        before on_step_begin.
        """

        def __init__(self, model, tokenizer):
            self.model, self.tokenizer, self.trained, self.mark, self.curve = model, tokenizer, 0.0, 0.0, []

        def on_train_begin(self, *_, **__):
            self.mark = now()

        def on_step_end(self, _args, state, control, **__):
            self.trained += now() - self.mark
            if state.global_step % args.eval_every == 0 or self.trained >= args.budget_s:
                acc = accuracy(self.model, self.tokenizer, examples, cfg.task)
                self.curve.append({"step": state.global_step, "train_s": self.trained, "accuracy": acc})
                print(f"  trl {task} seed {seed}: step {state.global_step} {self.trained:.0f}s acc {acc:.3f}", flush=True)
            control.should_training_stop = self.trained >= args.budget_s
            self.mark = now()

    with tempfile.TemporaryDirectory(prefix="recipes-trl-") as tmp:
        path = model_dir(argparse.Namespace(model=args.model), tmp)
        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        budget = Budget(model, tok)
        budget.curve.append({"step": 0, "train_s": 0.0, "accuracy": accuracy(model, tok, examples, cfg.task)})
        n = PROMPTS * GROUP
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=8, gradient_accumulation_steps=n // 8,
            num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=LR,
            beta=0.0, use_cpu=True, bf16=False, shuffle_dataset=False, seed=seed, max_steps=100_000,
            # rollmill recomputes no activations; checkpointing them (TRL's default) only costs time here
            gradient_checkpointing=False,
            logging_steps=1000, report_to="none", save_strategy="no", disable_tqdm=True)
        GRPOTrainer(model=model, reward_funcs=first_integer_reward, args=config, train_dataset=data,
                    processing_class=tok, callbacks=[budget]).train()
    return budget.curve


def run_child(args) -> int:
    import torch

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(args.threads)
    framework, recipe, task, seed = args.child.split(":")
    curve = train_trl(args, task, int(seed)) if framework == "trl" else train_rollmill(args, recipe, task, int(seed))
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps({"framework": framework, "recipe": recipe, "task": task, "seed": int(seed),
                            "budget_s": args.budget_s, "model": args.model, "clock": args.clock,
                            "threads": args.threads, "curve": curve}) + "\n")
    return 0


def load_results(out: Path, args) -> list[dict]:
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    # runs timed another way are not comparable with these
    same = {"model": args.model, "clock": args.clock, "threads": args.threads}
    return [r for r in rows if all(r.get(k) == v for k, v in same.items())
            and r["budget_s"] == (args.trl_budget_s if r["framework"] == "trl" else args.budget_s)]


def time_to(curve: list[dict], target: float) -> float | None:
    return next((p["train_s"] for p in curve if p["accuracy"] >= target), None)


def label(row: dict) -> str:
    return "trl_grpo" if row["framework"] == "trl" else row["recipe"]


def summary(rows: list[dict], at_step: int) -> dict[tuple[str, str], dict]:
    """Per (task, label): final accuracies over seeds, their mean and min-max, the mean over seeds of each
    seed's last three evaluations (steadier than the last one alone), steps trained, accuracy at `at_step`
    (when every seed evaluated there), median time to TARGET."""
    out: dict[tuple[str, str], dict] = {}
    for row in rows:
        entry = out.setdefault((row["task"], label(row)), {"final": [], "last3": [], "start": [], "to_target": [],
                                                           "steps": [], "at_step": []})
        entry["final"].append(row["curve"][-1]["accuracy"])
        entry["steps"].append(row["curve"][-1]["step"])
        entry["at_step"].append(next((p["accuracy"] for p in row["curve"] if p["step"] == at_step), None))
        entry["last3"].append(statistics.mean(p["accuracy"] for p in row["curve"][-3:]))
        entry["start"].append(row["curve"][0]["accuracy"])
        entry["to_target"].append(time_to(row["curve"], TARGET))
    for entry in out.values():
        entry["mean"] = statistics.mean(entry["final"])
        # a seed that never got there counts as slower than every seed that did
        entry["median_to_target"] = statistics.median(float("inf") if t is None else t for t in entry["to_target"])
    return out


def write_table(stats: dict, out: Path, at_step: int) -> str:
    lines = [f"| task | recipe | seeds | start | final (mean) | final (min-max) | last 3 evals (mean) | steps | "
             f"at step {at_step} (mean) | time to {TARGET} (median) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (task, name), s in sorted(stats.items(), key=lambda kv: (kv[0][0], -kv[1]["mean"])):
        t = s["median_to_target"]
        shown = "not reached" if t == float("inf") else f"{t:.0f} s"
        at = "-" if None in s["at_step"] else f"{statistics.mean(s['at_step']):.3f}"
        lines.append(f"| {task} | {name} | {len(s['final'])} | {statistics.mean(s['start']):.3f} | {s['mean']:.3f} | "
                     f"{min(s['final']):.3f}-{max(s['final']):.3f} | {statistics.mean(s['last3']):.3f} | "
                     f"{min(s['steps'])}-{max(s['steps'])} | {at} | {shown} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for task in sorted({r["task"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in sorted({label(r) for r in rows if r["task"] == task}):
            curves = [r["curve"] for r in rows if r["task"] == task and label(r) == name]
            grid = np.linspace(0, max(c[-1]["train_s"] for c in curves), 60)
            # each seed's accuracy held from one evaluation to the next (every curve starts at 0 s)
            held = np.array([[[p["accuracy"] for p in c if p["train_s"] <= x][-1] for x in grid] for c in curves])
            style = {"color": "black", "linestyle": "--"} if name == "trl_grpo" else {}
            ax.plot(grid, held.mean(0), label=f"{name} ({len(curves)} seeds)", **style)
            ax.fill_between(grid, held.min(0), held.max(0), alpha=0.12, **({"color": "black"} if style else {}))
        ax.axhline(TARGET, color="grey", linewidth=0.6)
        clock = "CPU time of one core" if rows[0].get("clock") == "cpu" else "wall-clock"
        ax.set(title=f"{task}: greedy held-out accuracy", xlabel=f"training time (s, {clock}; evaluation excluded)",
               ylabel="accuracy", ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=110)
        plt.close(fig)


def result_line(stats: dict, tasks: list[str], trl_budget_s: float) -> str:
    """Median time to TARGET of rollmill's GRPO and TRL's (nan: no such run, or its median never got there);
    when only TRL never got there, its budget over rollmill's time is a lower bound on the speed-up."""
    nan = float("nan")
    parts = []
    for task in tasks:
        times = [stats.get((task, name), {}).get("median_to_target", nan) for name in ("grpo", "trl_grpo")]
        ours, trl = (nan if t == float("inf") else t for t in times)
        speedup = trl / ours if ours > 0 else nan
        at_least = trl_budget_s / ours if times[1] == float("inf") and ours > 0 else nan
        best_final, best = max(((s["mean"], name) for (t, name), s in stats.items() if t == task), default=(nan, "none"))
        parts += [f"{task}_rollmill_grpo_s_to_{TARGET}={ours:.1f}", f"{task}_trl_grpo_s_to_{TARGET}={trl:.1f}",
                  f"{task}_speedup={speedup:.2f}", f"{task}_speedup_at_least={at_least:.2f}", f"{task}_best={best}",
                  f"{task}_best_final={best_final:.3f}"]
    return "RESULT " + " ".join(parts)


def run_all(args, out: Path, runs: list[tuple]) -> None:
    """Runs each as a child process, `args.parallel` at a time, each parallel child on its own core."""
    free, running = list(range(args.parallel)), {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    while runs or running:
        while runs and free:
            run, cpu = runs.pop(0), free.pop(0)
            print(f"--- {' '.join(map(str, run))}", flush=True)
            budget, every = (args.trl_budget_s, args.trl_eval_every) if run[0] == "trl" else (args.budget_s, args.eval_every)
            child = [sys.executable, __file__, "--child", ":".join(map(str, run)), "--out", str(out),
                     "--budget-s", str(budget), "--eval-every", str(every), "--model", args.model,
                     "--parallel", str(args.parallel), "--threads", str(args.threads)]
            if args.parallel > 1:
                child += ["--cpu", str(cpu)]
            running[subprocess.Popen(child, env=env)] = (run, cpu)
        while (proc := next((p for p in running if p.poll() is not None), None)) is None:
            time.sleep(1)
        run, cpu = running.pop(proc)
        free.append(cpu)
        if proc.returncode:
            print(f"--- {' '.join(map(str, run))} failed; going on", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    done = {(r["framework"], r["recipe"], r["task"], r["seed"]) for r in load_results(out, args)}
    # seed-major order: an interrupted study has every recipe's first seeds before any recipe's last
    runs = [("rollmill", recipe, task, seed) for seed in seeds for task in tasks for recipe in args.recipes]
    if not args.no_trl:
        if subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode:
            print("--- trl is not installed (make bench installs it): no TRL baseline", flush=True)
        else:
            runs += [("trl", "grpo", task, seed) for seed in seeds for task in tasks]
            runs.sort(key=lambda run: seeds.index(run[3]))
    if not args.report:
        run_all(args, out, [run for run in runs if run not in done])
    rows = [r for r in load_results(out, args) if r["task"] in tasks]
    stats = summary(rows, args.at_step)
    print(write_table(stats, out, args.at_step))
    plot(rows, out)
    print(f"plots and table in {out}")
    print(result_line(stats, tasks, args.trl_budget_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
