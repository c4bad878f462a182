"""Does a trained guess_number agent use the hints? Initial weights vs a run's last checkpoint.

    .venv/bin/python benchmarks/guess_number_hints.py RUN_DIR [--episodes 64]

Plays the held-out seeds at temperature 1 with both sets of weights and reports success and the
share of guesses (after the first) that lie inside the interval the hints still allow: about 1/3
for a model guessing blindly in 1..8, 1.0 for one that never ignores a hint.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rollmill.agent import AgentLoop
from rollmill.config import load_config
from rollmill.envs import make_env
from rollmill.models import load_model
from rollmill.pipelines.common import EVAL_SEED_BASE
from rollmill.pipelines.common import sampling_params
from rollmill.rollout import HFEngine
from rollmill.train import list_checkpoints
from rollmill.train.checkpoint import load_weights


def measure(cfg, checkpoint: Path | None, episodes: int) -> tuple[float, float]:
    model, tok = load_model(cfg.model)
    if checkpoint is not None:
        load_weights(checkpoint, model)
    loop = AgentLoop(HFEngine(model, tok), tok, cfg.agent, sampling_params(cfg.rollout.sampling, n=1, temperature=1.0))
    envs = [make_env(cfg.env.name, **cfg.env.kwargs) for _ in range(episodes)]
    trajs = loop.play(envs, [EVAL_SEED_BASE + i for i in range(episodes)], list(range(episodes)), [7 + i for i in range(episodes)])
    inside = total = 0
    for traj in trajs:
        for turn in traj.turns[1:]:
            if turn.invalid or turn.action is None:
                continue
            lo, hi = map(int, turn.state.split("-"))  # the interval the hints allowed before this guess
            inside += lo <= int(re.findall(r"-?\d+", turn.action)[0]) <= hi
            total += 1
    return sum(t.success for t in trajs) / episodes, inside / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    if cfg.env.name != "guess_number":
        raise SystemExit(f"{args.run_dir} trained on {cfg.env.name!r}, not guess_number")
    base_success, base_inside = measure(cfg, None, args.episodes)
    success, inside = measure(cfg, list_checkpoints(args.run_dir / "checkpoints")[-1], args.episodes)
    print(f"RESULT initial_success={base_success:.3f} trained_success={success:.3f} "
          f"initial_hint_consistent={base_inside:.3f} trained_hint_consistent={inside:.3f}")


if __name__ == "__main__":
    main()
