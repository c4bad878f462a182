"""End-to-end learning check: GRPO must move a tiny random model toward the reward, measurably."""

import pytest

from rollmill.pipelines.rlvr import train
from rollmill.track import read_jsonl


@pytest.mark.slow
def test_grpo_teaches_a_tiny_model_to_start_with_a_digit(tiny_cfg, tmp_path):
    # A random character-level model starts a reply with a digit ~10% of the time.
    cfg = tiny_cfg(
        reward={"functions": [{"name": "format", "kwargs": {"pattern": "[0-9].*"}}]},
        rollout={"prompts_per_step": 4, "group_size": 8, "sampling": {"max_new_tokens": 3}},
        algorithm={"track_kl": False},
        train={"steps": 20, "lr": 1e-2, "micro_batch_size": 32},
        eval={"every": 0},
        checkpoint={"every": 0},
    )
    result = train(cfg, tmp_path / "run")
    rewards = [r["reward/mean"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert sum(rewards[:2]) / 2 < 0.3
    assert sum(rewards[-5:]) / 5 > 0.9
    assert result.eval_before["eval/accuracy"] < 0.5 <= 0.9 <= result.eval_after["eval/accuracy"]
