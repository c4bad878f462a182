"""Tiny training runs whose samples, metrics and final weights pin down the synchronous algorithm.

`tests/data/sync_reference.json` was recorded with the lockstep pipelines before the runtime (rollout
workers, sample queue, learner) replaced them; `test_runtime.py` checks that `async.max_staleness: 0`
still gives the same runs. Re-record only when a change is meant to alter the synchronous algorithm:

    .venv/bin/python tests/reference_runs.py --record tests/data/sync_reference.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from rollmill.config import config_from_dict
from rollmill.track import deterministic_metrics, read_jsonl

_RLVR = {
    "name": "ref-rlvr",
    "model": {"source": "tiny"},
    "task": {"source": "arithmetic", "name": "add_1digit", "train_size": 64, "eval_size": 8},
    "reward": {"functions": [{"name": "format", "kwargs": {"pattern": ".*[0-9].*"}}, {"name": "first_integer"}]},
    "rollout": {"prompts_per_step": 2, "group_size": 4, "sampling": {"max_new_tokens": 6}},
    "train": {"steps": 3, "lr": 1e-2, "micro_batch_size": 3},
    "algorithm": {"track_kl": True},  # recorded when KL was tracked by default: `kl` is in its metrics
    "checkpoint": {"every": 0},
    "eval": {"every": 3},
    "log": {"progress": False, "trackers": []},
}

CONFIGS = {
    "rlvr": _RLVR,
    "rlvr_dynamic_ppo_epochs": {**_RLVR, "filters": {"dynamic_sampling": True, "max_refill_rounds": 2},
                                "rollout": {"prompts_per_step": 3, "group_size": 2, "sampling": {"max_new_tokens": 6}},
                                "train": {**_RLVR["train"], "ppo_epochs": 2, "mini_batch_size": 4},
                                "algorithm": {"name": "dapo", "track_kl": True}},
    "rlvr_critic": {**_RLVR, "algorithm": {"name": "ppo", "track_kl": True}},
    "agentic": {
        "name": "ref-agentic", "pipeline": "agentic", "model": {"source": "tiny"},
        "env": {"name": "frozenlake", "kwargs": {"size": 4, "slippery": False, "view": "cell"}, "eval_episodes": 4},
        "agent": {"max_turns": 4, "chat_template": False, "action_format": "raw", "system_prompt": "",
                  "format_hint": False, "credit": "gigpo"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "sampling": {"max_new_tokens": 2}},
        "train": {"steps": 3, "lr": 3e-3, "micro_batch_size": 8},
        "algorithm": {"track_kl": True},
        "checkpoint": {"every": 0},
        "eval": {"every": 3},
        "log": {"progress": False, "trackers": []},
    },
}


def weights_summary(path: Path) -> dict:
    """A hash of the exact bytes and a per-tensor sum (to compare within a tolerance across CPUs)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    digest = hashlib.sha256()
    sums = {}
    for name in sorted(state):
        digest.update(state[name].contiguous().numpy().tobytes())
        sums[name] = float(state[name].double().abs().sum())
    return {"sha256": digest.hexdigest(), "abs_sums": sums}


def run(name: str, run_dir: Path, **sections) -> dict:
    """Train reference config `name` (sections override it) into `run_dir`; return what it produced."""
    from rollmill.runtime import train

    data = json.loads(json.dumps(CONFIGS[name]))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    train(config_from_dict(data), run_dir)
    samples = [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(run_dir / "samples.jsonl")]
    final = sorted((run_dir / "checkpoints").iterdir())[-1]
    return {"metrics": deterministic_metrics(run_dir / "metrics.jsonl"), "samples": samples,
            "weights": weights_summary(final / "model.safetensors")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the test suite runs
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: run(name, Path(tmp) / name) for name in CONFIGS}
    args.record.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sorted(out)} into {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
