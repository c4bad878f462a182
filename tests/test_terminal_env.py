"""The terminal env: tool parsing, the four tools, the timeout hierarchy, and an RL run on it."""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_config_dict

from rollmill.config import config_from_dict
from rollmill.envs import make_env
from rollmill.envs.terminal import clip, parse_tool_call

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.mark.parametrize("text, expected", [
    ("bash: ls -la", ("bash", "ls -la", "")),
    ("  bash ls", ("bash", "ls", "")),
    ("read_file: notes.txt", ("read_file", "notes.txt", "")),
    ("write_file: out.txt\nline 1\nline 2", ("write_file", "out.txt", "line 1\nline 2")),
    ("finish", ("finish", "", "")),
    ("I will list the files.\nbash: ls", ("bash", "ls", "")),
    ("Like this:\n```bash\necho hi > a.txt\n```\nDone.", ("bash", "echo hi > a.txt", "")),
    ("```sh\nls -l", ("bash", "ls -l", "")), ("```python\nprint(1)\n```", None),
    ('{"name": "bash", "arguments": {"command": "pwd"}}', ("bash", "pwd", "")),
    ('{"name": "write_file", "arguments": "{\\"path\\": \\"a\\", \\"content\\": \\"x\\"}"}', ("write_file", "a", "x")),
    ("bash:", None), ("write_file:\ncontent", None), ("rm -rf /", None), ('{"name": "bash"}', None), ("{not json", None),
])
def test_parse_tool_call(text, expected):
    assert parse_tool_call(text) == expected


def test_clip_keeps_head_and_tail():
    text = "a" * 50 + "b" * 50
    clipped = clip(text, 20)
    assert clipped.startswith("a" * 10) and clipped.endswith("b" * 10) and "80 characters cut" in clipped
    assert clip("short", 20) == "short"


@pytest.fixture
def env():
    e = make_env("terminal", names=["hello-file"], max_steps=4, command_timeout_s=1.0)
    yield e
    e.close()


@needs_bwrap
def test_solving_a_task_with_the_tools_earns_the_verifier_reward(env):
    obs, info = env.reset(seed=0)
    assert "hello" in obs.lower() and info["task"] == "hello-file" and info["state"] == ("hello-file", 0)
    obs, reward, terminated, truncated, info = env.step("bash: ls -a; echo done")
    assert "done" in obs and "[exit code 0]" in obs and reward == 0.0 and not (terminated or truncated)
    instruction = env.task.instruction
    target, content = ("hello.txt", "hello") if "hello.txt" in instruction else (None, None)
    assert target, f"unexpected instruction: {instruction}"
    solution = env.task.path / "solution" / "solve.sh"
    obs, *_ = env.step("write_file: /tmp/solve.sh\n" + solution.read_text())
    assert obs.startswith("wrote ")
    obs, *_ = env.step("bash: bash /tmp/solve.sh && cat hello.txt")
    assert content in obs
    obs, reward, terminated, truncated, info = env.step("finish")
    assert (reward, terminated, truncated, info["success"], info["limit"]) == (1.0, True, False, True, None)


@needs_bwrap
def test_doing_nothing_fails_and_bad_calls_are_invalid(env):
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("please do it")
    assert info["invalid_action"] and "Unknown tool call" in obs and not terminated
    assert "error" in env.step("read_file: nope.txt")[0]
    obs, reward, terminated, truncated, info = env.step("finish")
    assert reward == 0.0 and terminated and not info["success"]


@needs_bwrap
def test_each_limit_is_named_and_the_verifier_still_runs(tmp_path):
    env = make_env("terminal", names=["hello-file"], max_steps=2, command_timeout_s=0.5)
    env.reset(seed=0)
    obs, *_ = env.step("bash: sleep 5")
    assert "[command_timeout: killed after 0.5s]" in obs
    solve = (env.task.path / "solution" / "solve.sh").read_text()
    obs, reward, terminated, truncated, info = env.step(f"bash: {solve}")
    assert (reward, terminated, truncated, info["limit"]) == (1.0, False, True, "max_steps")  # reward kept
    env.close()
    slow = make_env("terminal", names=["hello-file"], agent_timeout_s=0.01)
    slow.reset(seed=0)
    obs, reward, terminated, truncated, info = slow.step("bash: sleep 0.1")
    assert truncated and info["limit"] == "agent_timeout" and info["verifier_status"] == "ok" and "verifier reward" in obs
    slow.close()


def test_unknown_task_names_are_rejected():
    with pytest.raises(ValueError, match="unknown terminal tasks"):
        make_env("terminal", names=["no-such-task"])


@needs_bwrap
def test_agentic_rl_on_the_terminal_env_runs_end_to_end(tmp_path):
    from rollmill.runtime import train
    from rollmill.track import format_samples, read_jsonl

    data = tiny_config_dict(
        tmp_path,
        env={"name": "terminal", "kwargs": {"names": ["hello-file", "sum-numbers"], "max_steps": 2}, "eval_episodes": 2},
        agent={"max_turns": 2, "action_format": "raw", "context": "keep_all", "max_context_tokens": 2048},
        rollout={"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 8}},
        train={"steps": 2},
        checkpoint={"every": 2}, eval={"every": 2},
    )
    cfg = config_from_dict({**data, "pipeline": "agentic"})
    train(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["episode/failed"] == 0.0 and records[-1]["episode/turns"] == 2.0
    assert records[-1]["end/limit_max_steps"] + records[-1]["end/terminated"] == 1.0
    text = format_samples(read_jsonl(tmp_path / "run" / "samples.jsonl"))
    assert "verifier reward: 0" in text  # every episode reached the verifier (via max_steps)


@needs_bwrap
def test_the_env_works_the_same_over_a_remote_sandbox_server(tmp_path, monkeypatch):
    from rollmill.sandbox.bwrap import BwrapBackend
    from rollmill.sandbox.serve import ServerThread
    from rollmill.sandbox.server import make_app
    from rollmill.terminal import builtin_tasks_dir

    local = BwrapBackend(root=tmp_path / "sb")
    monkeypatch.setenv("ROLLMILL_SANDBOX_TOKEN", "tok")
    try:
        with ServerThread(make_app(local, "tok", allowed_paths=(str(builtin_tasks_dir()),))) as server:
            env = make_env("terminal", names=["hello-file"], backend="remote", backend_url=server.url)
            env.reset(seed=0)
            assert local.list() == [env.sandbox_id]  # the sandbox lives on the server
            solve = (env.task.path / "solution" / "solve.sh").read_text()
            env.step(f"bash: {solve}")
            obs, reward, terminated, truncated, info = env.step("finish")
            assert (reward, terminated, info["success"]) == (1.0, True, True)
            env.close()
            assert local.list() == []
    finally:
        local.close()


@needs_bwrap
def test_envs_reset_concurrently_share_one_backend(monkeypatch):
    import asyncio

    from rollmill.agent.env_calls import call_env
    from rollmill.envs import terminal

    def call_all(calls, timeout):  # all at once, as concurrent episodes make them
        async def gather():
            return await asyncio.gather(*(call_env(fn, args, timeout) for fn, args in calls))

        return asyncio.run(gather())

    monkeypatch.setattr(terminal, "_BACKENDS", {})  # the race is in building the first backend
    envs = [make_env("terminal", names=["hello-file"], max_steps=3) for _ in range(4)]
    try:
        assert all(r.error is None for r in call_all([(e.reset, (0,)) for e in envs], 60))
        assert len(terminal._BACKENDS) == 1
        results = call_all([(e.step, ("bash: echo ok",)) for e in envs], 60)
        assert [r.error for r in results] == [None] * 4 and all("ok" in r.value[0] for r in results)
    finally:
        for e in envs:
            e.close()
        for backend in terminal._BACKENDS.values():
            backend.close()
