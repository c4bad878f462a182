"""The agentic pipeline end to end on a tiny model: run dir, credits, resume, broken envs, config errors."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config_dict

from rollmill.checks import check_config
from rollmill.config import ConfigError, config_from_dict
from rollmill.envs import ENVS, register_env
from rollmill.runtime import train
from rollmill.track import format_samples, read_jsonl


class Flaky:
    """Raises in `step` for odd seeds; hangs in `step` for seeds divisible by 5 when asked to."""

    instructions = "Say anything."

    def __init__(self, hang: bool = False, always: bool = False):
        self.hang, self.always = hang, always

    def reset(self, seed=None):
        self.seed = seed
        return f"seed {seed}", {"state": "start"}

    def step(self, action):
        if self.seed % 2 or self.always:
            raise ValueError("flaky env broke")
        if self.hang and self.seed % 5 == 0:
            import time

            time.sleep(3)
        return "done", float(len(action) % 2), True, False, {"state": "end"}


if "flaky_test" not in ENVS:
    register_env("flaky_test", "test env that raises for odd seeds")(Flaky)


@pytest.fixture
def agentic(tmp_path):
    """A tiny-model agentic config; keyword sections are merged over the defaults, validated and checked."""

    def make(**sections):
        data = tiny_config_dict(
            tmp_path,
            env={"name": "frozenlake", "eval_episodes": 4},
            agent={"max_turns": 3, "action_format": "raw", "context": "sliding_window", "window_turns": 1},
            rollout={"prompts_per_step": 2, "group_size": 3, "sampling": {"max_new_tokens": 3}},
        )
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value}
        return check_config(config_from_dict({**data, "pipeline": "agentic"}))

    return make


@pytest.mark.parametrize("credit", ["starpo", "gigpo", "ipa", "turning_point"])
def test_each_credit_trains_and_fills_the_run_dir(agentic, tmp_path, credit):
    # guess_number reads the first integer in a reply: a random model's replies are sometimes valid
    # and sometimes not, so every credit rule sees episodes that differ
    cfg = agentic(agent={"credit": credit}, env={"name": "guess_number", "kwargs": {"low": 1, "high": 4}},
                  train={"seed": 1})
    result = train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    last = records[-1]
    for key in ("episode/success", "episode/turns", "episode/invalid_rate", "episode/failed", "loss", "eval/success"):
        assert key in last
    assert last["train/rows"] >= 6
    assert sum(r.get("grad_norm", 0) > 0 for r in records) >= 2
    assert result.eval_after is not None and 0.0 <= result.eval_after["eval/success"] <= 1.0
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all("[[" in view for s in samples for view in s["trained_view"])
    text = format_samples(samples)
    assert text.count("--- step") == len(samples) and "turn 0: reply" in text and "env: " in text
    assert (tmp_path / "run" / "curves.png").is_file()
    if credit == "ipa":
        assert "mismatch/dropped_tokens" in last


def test_attention_credit_trains_episodes(agentic, tmp_path):
    cfg = agentic(algorithm={"anchor_credit": "preplan_anchor"}, env={"name": "guess_number", "kwargs": {"low": 1, "high": 4}},
                  train={"seed": 1, "steps": 2})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert any(r["grad_norm"] > 0 for r in records)


@pytest.mark.parametrize("mode", [{}, {"max_staleness": 1}])
def test_ipa_resampled_episodes_restart_from_a_chunk_boundary(agentic, tmp_path, mode):
    """In lockstep (sync) and asynchronous rollout alike: the resampled episode waits for episode 0 of its
    group without stalling its peers, then replays it up to the boundary and trains only what follows."""
    cfg = agentic(agent={"credit": "ipa", "ipa_resample": 1, "max_turns": 4},
                  env={"name": "guess_number", "kwargs": {"low": 1, "high": 9}},
                  rollout={"group_size": 3}, train={"seed": 1, "steps": 2}, log={"samples_per_step": 6},
                  **{"async": mode})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    resampled = [s for s in read_jsonl(tmp_path / "run" / "samples.jsonl") if "resampled_from" in s]
    assert sum(r.get("episode/resampled", 0) for r in records) > 0 and resampled
    for sample in resampled:
        k = sample["resampled_from"]["boundary"]
        assert sample["resampled_from"]["episode"] == 0 and 1 <= k < 4 and len(sample["turns"]) > k


def test_only_a_launch_that_holds_a_resampled_episode_publishes_its_episode_0(agentic):
    """With the group spread over workers, a piece without the group's last episodes has no reader for
    episode 0: publishing it would keep an entry that no reader ever drops."""
    import asyncio

    from rollmill.models import build_char_tokenizer
    from rollmill.pipelines.agentic import EnvEpisodes
    from rollmill.pipelines.base import EpisodeContext
    from rollmill.types import GroupSpec, Trajectory

    episodes = EnvEpisodes(agentic(agent={"credit": "ipa", "ipa_resample": 1}), build_char_tokenizer())

    def piece(*indices):  # the samples of group 7 that one launch holds
        return GroupSpec(7, 7, None, indices)

    assert [episodes._readers(piece(*i)) for i in [(0, 1, 2), (0, 2), (0, 1), (1,)]] == [1, 1, 0, 0]
    assert episodes._is_prefix(piece(0, 2), 0) and not episodes._is_prefix(piece(0, 1), 0)

    async def publish_then_read():
        ctx = EpisodeContext(generate=None, score=None)
        reader = asyncio.ensure_future(episodes._prefixes.get((7, 0), ctx, readers=episodes._readers(piece(0, 2))))
        await asyncio.sleep(0)
        episodes._prefixes.publish((7, 0), Trajectory(7, 0, 7))
        return await reader

    assert (asyncio.run(publish_then_read())).index == 0 and episodes._prefixes._waiting == {}


def test_ipa_resample_settings_are_checked(agentic):
    with pytest.raises(ConfigError, match="agent.ipa_resample=1 needs agent.credit 'ipa'"):
        agentic(agent={"ipa_resample": 1})
    with pytest.raises(ConfigError, match="must be below rollout.group_size=3"):
        agentic(agent={"credit": "ipa", "ipa_resample": 3})


def test_agentic_resume_reproduces_a_straight_run(agentic, straight_and_resumed):
    straight, resumed = straight_and_resumed(agentic(agent={"credit": "gigpo"}))
    assert straight == resumed


def test_broken_env_fails_its_episodes_and_the_run_goes_on(agentic, tmp_path):
    cfg = agentic(env={"name": "flaky_test", "kwargs": {"hang": True}, "step_timeout_s": 0.5},
                  rollout={"prompts_per_step": 4, "group_size": 2})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2})})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(records) == 2
    assert all(r["episode/failed"] > 0 for r in records)
    assert all(r["episode/failed"] == r["rollout/episodes"] * (r["end/env_error"] + r["end/env_timeout"]) for r in records)
    assert any(r["end/env_timeout"] > 0 for r in records) or any(r["end/env_error"] > 0 for r in records)
    assert all(r["groups/dropped_for_failure"] > 0 for r in records)


def test_an_env_that_always_fails_stops_the_run_with_a_clear_error(agentic, tmp_path):
    cfg = agentic(env={"name": "flaky_test", "kwargs": {"always": True}}, train={"steps": 10})
    with pytest.raises(RuntimeError, match="every episode failed for 3 steps"):
        train(cfg, tmp_path / "run")
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3  # eval before + 2 logged steps


def test_an_env_that_cannot_be_built_fails_before_the_model_loads(agentic, tmp_path):
    cfg = agentic(env={"name": "task", "kwargs": {"source": "file", "path": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(Exception, match="missing.jsonl"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize("section,value,message", [
    ("algorithm", {"name": "ppo"}, "does not support"),
    ("env", {"name": "frozenlak"}, "unknown env 'frozenlak'"),
    ("env", {"name": "frozenlake", "kwargs": {"slipery": True}}, "takes no argument"),
    ("agent", {"context": "everything"}, "keep_all"),
])
def test_bad_agentic_configs_fail_fast(agentic, section, value, message):
    with pytest.raises(ConfigError, match=message):
        agentic(**{section: value})


def test_cli_lists_envs():
    out = subprocess.run([str(Path(sys.executable).parent / "rollmill"), "envs"], capture_output=True, text=True, check=True).stdout
    for name in ("frozenlake", "sokoban", "guess_number", "wordle", "calculator", "task", "gymnasium", "gem"):
        assert name in out


def test_rlvr_samples_print_prompt_answer_and_completion():
    text = format_samples([{"step": 3, "prompt": "1+1?", "answer": "2", "completion": "2!", "reward": 1.0,
                            "correct": True, "finish_reason": "stop"}])
    assert text.splitlines() == ["--- step 3  reward +1.000  (stop)", "prompt:     1+1?", "answer:     2",
                                 "completion: 2!"]


def test_cli_eval_and_samples_on_an_agentic_run(agentic, tmp_path, capsys):
    from rollmill.cli import main

    train(agentic(train={"steps": 1}), tmp_path / "run")
    assert main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "4 held-out frozenlake episodes: success=" in out and "step_000001" in out
    assert main(["samples", str(tmp_path / "run")]) == 0
    assert "--- step 1  seed" in capsys.readouterr().out


def test_eval_summary_shows_failed_episodes_only_when_there_are_some():
    from rollmill.cli import _fmt

    assert _fmt({"eval/success": 0.5, "eval/failed": 0.0}) == "success=0.500"
    assert _fmt({"eval/success": 0.0, "eval/failed": 3.0}) == "success=0.000 failed=3"
