"""Generation throughput of rollmill's engines against plain `transformers.generate`, in one run.

Two workloads, the same prompts for every engine:
- group: P chat prompts x G samples, up to N new tokens, temperature 1 (an RLVR step's rollout).
  `generate` gets each prompt repeated G times in one left-padded batch (what TRL does).
- multiturn: E episodes x T turns; each turn appends the reply and a fixed observation to the episode's
  context and samples up to M new tokens (an agentic rollout). `generate` re-encodes every context each
  turn, as a loop without KV reuse must.

Engines: `generate` (the baseline), `hf` (rollmill's HFEngine), `hf_nocache` (HFEngine without its prefix
store: multi-turn KV reuse off), `hf_bf16` (HFEngine with bf16 weights and K/V: faster, log-probs no longer
exact), `hf_generic` (the fallback engine), `vllm` (VLLMEngine, when vllm imports
in the interpreter given by --vllm-python, by default .venv-vllm/bin/python if present).
Each engine runs in its own subprocess (this script with --only), so memory and threads don't mix.
Throughput = generated tokens (each sequence up to and including its eos) / wall time. Each engine first
runs the group case once untimed (warm-up), then the timed group case, then the multi-turn case.

Run: python benchmarks/rollout.py [--model smollm2|tiny] [--prompts 4] [--group 8] [--new-tokens 128]
        [--episodes 32] [--turns 5] [--turn-tokens 48] [--engines generate,hf,...]
Last line: `RESULT k=v ...` with tok/s per engine and workload and the ratios to `generate`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
ENGINES = ["generate", "hf", "hf_nocache", "hf_bf16", "hf_generic", "vllm"]
QUESTIONS = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue.",
    "What is 37 + 45? Show your reasoning.",
    "List three uses of a paperclip and explain each.",
    "Describe the water cycle in detail.",
    "How do I sort a list in Python?",
    "What causes the seasons on Earth?",
    "Give advice to someone learning to cook.",
]
# a rendered game board, about the size of a Sokoban or FrozenLake observation (~60 tokens)
OBSERVATION = ("You moved right. The board is now:\n#######\n#  .  #\n# $@  #\n#  #  #\n#  $ .#\n#######\n"
               "Boxes on targets: 0 of 2. What is your next move?")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--turn-tokens", type=int, default=48)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--vllm-python", default=None, help="interpreter with vllm installed (default: .venv-vllm/bin/python)")
    p.add_argument("--only", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = set(args.engines.split(",")) - set(ENGINES)
    if bad:
        p.error(f"--engines: unknown {sorted(bad)}; choose from {ENGINES}")
    return args


def load(args):
    from rollmill.config import ModelConfig
    from rollmill.models import load_model

    model, tok = load_model(ModelConfig(source=args.model))
    return model.eval(), tok


def chat_prompts(tok, n: int) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(n)]


def observation_ids(tok) -> list[int]:
    text = f"<|im_end|>\n<|im_start|>user\n{OBSERVATION}<|im_end|>\n<|im_start|>assistant\n"
    return tok(text, add_special_tokens=False)["input_ids"]


class HFGenerate:
    """The baseline: one `model.generate` call per batch, left padding, sampling, KV cache on."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        tok.padding_side = "left"

    def generate(self, prompts, new_tokens):
        import torch

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                  top_k=0, max_new_tokens=new_tokens, pad_token_id=self.tok.pad_token_id)[:, width:]
        replies = []
        for row in out.tolist():
            end = row.index(self.tok.eos_token_id) + 1 if self.tok.eos_token_id in row else len(row)
            replies.append(row[:end])
        return replies


class RollmillEngine:
    def __init__(self, engine):
        self.engine = engine
        self.last = []

    def generate(self, prompts, new_tokens):
        from rollmill.rollout import SamplingParams

        self.last = self.engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens), seed=0)
        return [c.token_ids for c in self.last]


def build(name, model, tok):
    if name == "generate":
        return HFGenerate(model, tok)
    if name == "vllm":
        from rollmill.rollout.vllm import VLLMEngine

        return RollmillEngine(VLLMEngine.from_model(model, tok))
    import torch

    from rollmill.rollout import GenericHFEngine, HFEngine

    if name == "hf_generic":
        return RollmillEngine(GenericHFEngine(model, tok, batch_size=64))
    return RollmillEngine(HFEngine(model, tok, batch_size=64, prefix_cache_mb=0 if name == "hf_nocache" else 2048,
                                   dtype=torch.bfloat16 if name == "hf_bf16" else None))


def group_case(runner, tok, args) -> dict:
    prompts = [p for p in chat_prompts(tok, args.prompts) for _ in range(args.group)]
    t0 = time.perf_counter()
    replies = runner.generate(prompts, args.new_tokens)
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, replies))
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def multiturn_case(runner, tok, args) -> dict:
    contexts = chat_prompts(tok, args.episodes)
    obs = observation_ids(tok)
    tokens, t0 = 0, time.perf_counter()
    for turn in range(args.turns):
        replies = runner.generate(contexts, args.turn_tokens)
        tokens += sum(map(len, replies))
        if turn < args.turns - 1:
            contexts = [c + r + obs[1:] if r and r[-1] == tok.eos_token_id else c + r + obs for c, r in zip(contexts, replies)]
    seconds = time.perf_counter() - t0
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "final_context": max(map(len, contexts))}


def run_only(args) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, tok = load(args)
    runner = build(args.only, model, tok)
    # warm-up: the group case itself, untimed, so every engine is measured in the steady state an RL
    # loop runs in (first-call allocations, lazy inits, the allocator's first page faults)
    group_case(runner, tok, args)
    res = {"group": group_case(runner, tok, args)}
    if isinstance(runner, RollmillEngine):  # engine vs trainer log-probs of the same tokens, same weights
        from rollmill.train import engine_logprob_gap

        res["consistency"] = engine_logprob_gap(model, runner.last[:16], tok.pad_token_id)
    engine = getattr(runner, "engine", None)
    if hasattr(engine, "stats"):
        engine.stats = type(engine.stats)()  # count the multi-turn case alone
    res["multiturn"] = multiturn_case(runner, tok, args)
    if hasattr(engine, "stats"):
        res["stats"] = dict(vars(engine.stats))
    return res


def run_child(name, args) -> dict:
    python = sys.executable
    if name == "vllm":
        python = args.vllm_python or str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")
        probe = subprocess.run([python, "-c", "import vllm"], capture_output=True) if Path(python).exists() else None
        if probe is None or probe.returncode:
            print(f"NOTE: vllm is not importable by {python}; skipping it (make install-vllm)")
            return {"error": "not installed"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    opts = ["model", "prompts", "group", "new_tokens", "episodes", "turns", "turn_tokens"]
    cmd = [python, __file__, "--only", name, "--result-file", result_file]
    cmd += [x for o in opts for x in (f"--{o.replace('_', '-')}", str(getattr(args, o)))]
    print(f"--- {name}", flush=True)
    try:
        if subprocess.run(cmd).returncode:
            return {"error": "failed"}
        return json.loads(Path(result_file).read_text())
    finally:
        os.unlink(result_file)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        res = run_only(args)
        Path(args.result_file).write_text(json.dumps(res)) if args.result_file else print(json.dumps(res, indent=1))
        return 0
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("NOTE: the machine is busy before starting; timings will be noisy")
    rows = {name: run_child(name, args) for name in args.engines.split(",")}
    base = rows.get("generate", {})
    print(f"\n{'engine':<12}{'group tok/s':>14}{'x generate':>12}{'multiturn tok/s':>18}{'x generate':>12}")
    fields = {}
    for name, res in rows.items():
        if "error" in res:
            print(f"{name:<12}  ({res['error']})")
            continue
        g, m = res["group"]["tok_s"], res["multiturn"]["tok_s"]
        gx = g / base["group"]["tok_s"] if "group" in base else math.nan
        mx = m / base["multiturn"]["tok_s"] if "multiturn" in base else math.nan
        print(f"{name:<12}{g:>14.1f}{gx:>12.2f}{m:>18.1f}{mx:>12.2f}")
        if "consistency" in res:
            c = res["consistency"]
            print(f"{'':<12}log-prob gap vs trainer over {c['tokens']:.0f} tokens: mean {c['mean']:.2e} max {c['max']:.2e}")
            fields.update({f"{name}_logprob_gap_mean": c["mean"], f"{name}_logprob_gap_max": c["max"]})
        if "stats" in res:
            print(f"{'':<12}multi-turn counters: " + " ".join(f"{k}={v:.3g}" for k, v in res["stats"].items()))
        fields.update({f"{name}_group_tok_s": g, f"{name}_multiturn_tok_s": m})
        if name != "generate":
            fields.update({f"{name}_group_x": gx, f"{name}_multiturn_x": mx})
    shape = (f"model={args.model} group={args.prompts}x{args.group}x{args.new_tokens} "
             f"multiturn={args.episodes}x{args.turns}x{args.turn_tokens}")
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in fields.items()) + " " + shape)
    return 1 if any(r.get("error") == "failed" for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
