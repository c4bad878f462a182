"""Time one GRPO step of rollmill and of TRL's GRPOTrainer on the same model, prompts and settings.

Workload (defaults): SmolLM2-135M-Instruct, fp32, CPU, 2 torch threads; 4 prompts x 8 samples = 32
completions per step, up to 64 new tokens, temperature 1.0; lr 2e-6, no KL, one optimizer step per batch
in micro-batches of 8. Prompts are rollmill's `add_2digit` task ("What is A + B? Answer with just the
number.", chat template), the same ones in the same order on both sides; reward 1 if the first integer
of the reply equals A + B.

Each framework runs in its own subprocess (this script with `--only ...`), so memory and threads don't
interfere; peak RSS is that child's ru_maxrss (os.wait4). Per framework one warm-up step is dropped, then
the median over `--steps` steps is reported, split as gen (sampling the completions) + train (the rest:
scoring, forward/backward, optimizer). rollmill: step = wall time of `rollout_and_train()`, gen = its
`time/rollout_s`, update = its `time/train_s` (policy update alone). TRL: step = a callback's
on_step_begin -> on_step_end, gen = time inside `GRPOTrainer._generate` (tokenize, generate, decode).

rollmill also runs in the training variants of `--variants` (each its own child, same workload):
fp32 (full fine-tuning, the comparison above), lora (`model.lora.rank=16`, every linear layer),
bf16 (`train.precision=bf16`: bf16 autocast, fp32 weights), lora_bf16 (both), and lora_bf16w (LoRA
over a bfloat16 base: `model.dtype=bfloat16`, so the engine also serves bf16 weights; adapters fp32).

Run: `make bench` (installs `.[dev,bench]`, pinning trl==1.16.0, then runs this), or
    python benchmarks/grpo_step.py [--model smollm2|tiny] [--steps 2] [--max-new-tokens 64]
        [--prompts 4] [--group 8] [--micro-batch 8] [--variants fp32,lora,...] [--only rollmill|trl]
`--model tiny` (random 2-layer Llama, character tokenizer) is a quick smoke test of the script itself.
Without trl only rollmill runs, and RESULT has trl_step_s=nan speedup=nan. Last line: `RESULT k=v ...`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

THREADS = 2
SEED = 0
# rollmill's training variants: config sections merged over the common workload
VARIANTS = {
    "fp32": {},
    "lora": {"model": {"lora": {"rank": 16}}},
    "bf16": {"train": {"precision": "bf16"}},
    "lora_bf16": {"model": {"lora": {"rank": 16}}, "train": {"precision": "bf16"}},
    "lora_bf16w": {"model": {"lora": {"rank": 16}, "dtype": "bfloat16"}},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--only", choices=["rollmill", "trl"], help="run one framework in this process")
    p.add_argument("--variants", default=",".join(VARIANTS), help="rollmill training variants to time")
    p.add_argument("--variant", default="fp32", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # a child's
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # where a child writes its timings
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if (args.prompts * args.group) % args.micro_batch:
        p.error("--prompts x --group must be a multiple of --micro-batch (TRL accumulates whole micro-batches)")
    return args


def run_config(args, run_root: str):
    from rollmill.config import config_from_dict

    sections = {
        "model": {"source": args.model},
        "task": {"source": "arithmetic", "name": "add_2digit"},
        "reward": {"functions": [{"name": "first_integer"}]},
        "rollout": {"prompts_per_step": args.prompts, "group_size": args.group, "logprob_check": "off",
                    "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}},
        "algorithm": {"name": "grpo", "kl_coef": 0.0, "track_kl": False},  # TRL runs no reference at beta 0
        "train": {"lr": 2e-6, "micro_batch_size": args.micro_batch, "seed": SEED},
        "log": {"run_root": run_root, "trackers": [], "progress": False, "samples_per_step": 0},
    }
    for key, value in VARIANTS[args.variant].items():
        sections[key] = {**sections[key], **value}
    return config_from_dict(sections)


def bench_rollmill(args) -> dict:
    from rollmill.runtime.local import LocalRoles
    from rollmill.runtime.rl import RLJob

    with tempfile.TemporaryDirectory(prefix="bench-rollmill-") as tmp:
        job = RLJob(run_config(args, tmp), Path(tmp) / "run", LocalRoles)
        steps = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            rec, _ = job.train_step()
            steps.append({"step": time.perf_counter() - t0, "gen": rec["time/rollout_s"], "update": rec["time/train_s"],
                          "len": rec["response_length/mean"], "old_logp": rec.get("time/old_logprobs_s", 0.0),
                          "fwd_bwd": rec.get("time/forward_backward_s", 0.0), "optim": rec.get("time/optimizer_s", 0.0),
                          "sync": rec.get("time/sync_s", 0.0), "mismatch": rec.get("logprob_mismatch", math.nan)})
        job.close()
    return {"steps": steps}


def same_prompts(args):
    """The examples rollmill's pipeline takes, in its order (same task split and cursor seed)."""
    from rollmill.pipelines.common import PromptCursor
    from rollmill.tasks import load_task

    cfg = run_config(args, "unused")
    train, _ = load_task(cfg.task)
    # Twice what max_steps needs, so TRL's sampler never reaches an epoch boundary inside the run.
    order = PromptCursor(len(train), seed=cfg.task.seed + cfg.train.seed).take(2 * (args.steps + 1) * args.prompts)
    return [train[i] for i in order]


def model_dir(args, tmp: str) -> Path:
    """A plain HF folder holding exactly the weights rollmill loads for `args.model`."""
    if args.model == "smollm2":
        from rollmill.models.load import smollm2_dir

        return smollm2_dir()
    from rollmill.models import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()  # same builder, sizes and seed as rollmill's model.source=tiny
    out = Path(tmp) / "tiny"
    build_tiny_model(len(tok), eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def first_integer_reward(completions, answer, **_):
    from rollmill.rewards.functions import first_integer
    from rollmill.tasks import Example

    return [first_integer(c[-1]["content"], Example(id="", prompt="", answer=a)) for c, a in zip(completions, answer)]


def trl_config(args, out_dir: str):
    from trl import GRPOConfig

    # transformers 5 renamed gradient_checkpointing; the old name still works and is the one TRL documents.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    n = args.prompts * args.group
    return GRPOConfig(
        output_dir=out_dir,
        # One optimizer step = one generation batch of n completions, in micro-batches like rollmill's:
        # steps_per_generation defaults to gradient_accumulation_steps, so generation_batch_size = n.
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=n // args.micro_batch,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
        learning_rate=2e-6, lr_scheduler_type="constant", optim="adamw_torch",  # rollmill: plain AdamW, constant lr
        beta=0.0, num_iterations=1, loss_type="dapo",  # dapo = token mean over the whole step, like rollmill's
        bf16=False, use_cpu=True, gradient_checkpointing=False,  # TRL defaults True; rollmill doesn't checkpoint
        shuffle_dataset=False, seed=SEED, max_steps=args.steps + 1, logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )


def bench_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.gen, self.t0 = [], 0.0, 0.0

        def on_step_begin(self, *_, **__):
            self.gen, self.t0 = 0.0, time.perf_counter()

        def on_step_end(self, *_, **__):
            self.steps.append({"step": time.perf_counter() - self.t0, "gen": self.gen})

        def on_log(self, args, state, control, logs=None, **_):  # logged just after on_step_end
            if logs and "completions/mean_length" in logs and self.steps:
                self.steps[-1]["len"] = logs["completions/mean_length"]

    examples = same_prompts(args)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer} for e in examples])
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        path = model_dir(args, tmp)
        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token = tok.pad_token or tok.eos_token  # as rollmill's loader does
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=first_integer_reward, args=trl_config(args, tmp),
                              train_dataset=data, processing_class=tok, callbacks=[timer])
        generate = trainer._generate

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                timer.gen += time.perf_counter() - t0

        trainer._generate = timed_generate  # an instance attribute shadows the method for this trainer only
        trainer.train()
    return {"steps": timer.steps}


BENCHES = {"rollmill": bench_rollmill, "trl": bench_trl}


def run_child(which: str, args, variant: str = "fp32") -> dict:
    """Re-invoke this script with --only (and a rollmill --variant); return its timings plus its peak RSS (MiB)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    opts = ["model", "steps", "max_new_tokens", "prompts", "group", "micro_batch"]
    cmd = [sys.executable, __file__, "--only", which, "--variant", variant, "--result-file", result_file]
    cmd += [x for o in opts for x in (f"--{o.replace('_', '-')}", str(getattr(args, o)))]
    print(f"--- {which}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it gives this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        if proc.returncode != 0:
            return {"error": f"exit status {proc.returncode}"}
        res = json.loads(Path(result_file).read_text())
    finally:
        os.unlink(result_file)
    return {**res, "rss_mib": usage.ru_maxrss / 1024}  # Linux reports KiB


def summarize(res: dict) -> dict:
    """Medians over the timed steps (the first, warm-up, step dropped); train = step - gen."""
    timed = res["steps"][1:] or res["steps"]
    keys = {k for s in timed for k in s}
    med = {k: statistics.median(s[k] for s in timed if k in s) for k in keys}
    med["train"] = med["step"] - med["gen"]
    return {**med, "rss_mib": res.get("rss_mib", math.nan)}


def print_table(rows: dict[str, dict]) -> None:
    cols = {"step": "step_s", "gen": "gen_s", "train": "train_s", "update": "update_s", "sync": "sync_s",
            "len": "mean_len", "rss_mib": "rss_mib", "mismatch": "lp_gap"}
    print(f"\n{'run':<12}" + "".join(f"{c:>10}" for c in cols.values()))
    for name, row in rows.items():
        print(f"{name:<12}" + "".join(f"{row.get(c, math.nan):>10.3f}" for c in cols))
    print("(medians; train = step - gen; update = rollmill's policy update alone; mean_len = mean completion tokens)")


def run_only(args) -> int:
    import torch

    torch.set_num_threads(THREADS)
    res = BENCHES[args.only](args)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(res))
    else:
        print(json.dumps(res, indent=1))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        return run_only(args)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:  # other jobs' threads oversubscribe the cores: step times then swing 10-100x
        print(f"NOTE: load average is {load:.1f} on {cores} cores before starting; timings will be noisy")
    variants = args.variants.split(",")
    rows = {"rollmill": run_child("rollmill", args)}
    if importlib.util.find_spec("trl") is None:
        print("NOTE: trl is not installed (pip install -e '.[dev,bench]'); timing rollmill only")
        rows["trl"] = {"error": "not installed"}
    else:
        rows["trl"] = run_child("trl", args)
    for variant in variants:
        if variant != "fp32":
            rows[variant] = run_child("rollmill", args, variant)
    failed = [name for name, res in rows.items() if "error" in res and res["error"] != "not installed"]
    for name in failed:
        print(f"NOTE: the {name} run failed ({rows[name]['error']}); see its output above")
    rows = {name: ({} if "error" in res else summarize(res)) for name, res in rows.items()}
    print_table({k: v for k, v in rows.items() if v})
    speedup = rows["trl"].get("step", math.nan) / rows["rollmill"].get("step", math.nan)  # > 1: rollmill faster
    print(f"speedup (trl step / rollmill step): {speedup:.2f}x")
    r, t = rows["rollmill"], rows["trl"]
    fields = {"rollmill_step_s": r.get("step"), "trl_step_s": t.get("step"), "speedup": speedup,
              "rollmill_gen_s": r.get("gen"), "rollmill_train_s": r.get("train"), "rollmill_update_s": r.get("update"),
              "trl_gen_s": t.get("gen"), "trl_train_s": t.get("train"),
              "rollmill_rss_mib": r.get("rss_mib"), "trl_rss_mib": t.get("rss_mib")}
    if r:
        rest = r["step"] - r["gen"] - r["fwd_bwd"] - r["optim"] - r["old_logp"] - r["sync"]
        print(f"rollmill step breakdown (s): rollout {r['gen']:.2f} | old-logprob recompute {r['old_logp']:.2f} | "
              f"forward+backward {r['fwd_bwd']:.2f} | optimizer {r['optim']:.2f} | weight sync {r['sync']:.2f} | "
              f"other (scoring, advantages, logging) {rest:.2f}")
        fields.update({"rollmill_fwd_bwd_s": r["fwd_bwd"], "rollmill_optim_s": r["optim"],
                       "rollmill_old_logp_s": r["old_logp"], "rollmill_sync_s": r["sync"]})
    for variant in (v for v in variants if v != "fp32" and rows.get(v)):
        v = rows[variant]
        fields.update({f"{variant}_step_s": v["step"], f"{variant}_speedup": t.get("step", math.nan) / v["step"],
                       f"{variant}_update_s": v["update"], f"{variant}_sync_s": v["sync"],
                       f"{variant}_rss_mib": v["rss_mib"], f"{variant}_logprob_gap": v.get("mismatch", math.nan)})
    if r:
        fields["rollmill_logprob_gap"] = r.get("mismatch", math.nan)
    extra = f"completions={args.prompts * args.group} max_new_tokens={args.max_new_tokens} model={args.model}"
    print("RESULT " + " ".join(f"{k}={math.nan if v is None else v:.3f}" for k, v in fields.items()) + " " + extra)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
