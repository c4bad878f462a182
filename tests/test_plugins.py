"""User code named in YAML: rewards, envs and task sources as `module:attr`, `file.py:attr` or
entry points (rollmill.plugins), in either reward form, async included."""

from __future__ import annotations

import sys
import time

import pytest

from rollmill.checks import check_config
from rollmill.config import ConfigError, RewardConfig, RewardFn, TaskConfig
from rollmill.envs import make_env
from rollmill.plugins import PluginError, resolve
from rollmill.rewards import compute_rewards
from rollmill.tasks import Example, load_task

USER_CODE = '''
import asyncio, time

def has_answer(prompts, completions, answer, **columns):
    """TRL's form: lists in, one float per completion out; extra columns arrive as lists too."""
    return [float(a in c) * (2.0 if d == "hard" else 1.0) for c, a, d in zip(completions, answer, columns["difficulty"])]

def strict_batch(prompts, completions):
    return [1.0] * len(completions)

async def slow_sample(completion, example, delay=0.2):
    await asyncio.sleep(delay)
    return len(completion)

async def slow_batch(prompts, completions, **kwargs):
    await asyncio.sleep(0.01)
    return [0.5] * len(completions)

def flaky(completion, example):
    if "boom" in completion:
        raise RuntimeError("bad sample")
    return 1.0

def load(cfg):
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "difficulty": "hard" if i % 2 else "easy"} for i in range(12)]
    return rows[:8], rows[8:]

class Counter:
    """Count to a target: say 'up' until the count reaches it."""
    instructions = "Say up."

    def __init__(self, target=2):
        self.target, self.n = target, 0

    def reset(self, seed=None):
        self.n = 0
        return "0", {}

    def step(self, action):
        self.n += action.strip() == "up"
        done = self.n >= self.target
        return str(self.n), float(done), done, False, {"success": done}
'''


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    path = tmp_path / "project" / "my_code.py"
    path.parent.mkdir()
    path.write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    return "project/my_code.py"


def examples(n: int, difficulty=("easy", "hard")) -> list[Example]:
    return [Example(f"e{i}", f"q{i}", str(i), {"difficulty": difficulty[i % 2]}) for i in range(n)]


def rewards(*functions) -> RewardConfig:
    return RewardConfig(functions=[RewardFn(name=name, kwargs=kwargs) for name, kwargs in functions])


def test_a_batch_reward_from_a_file_gets_every_column(user_file):
    cfg = rewards((f"{user_file}:has_answer", {}))
    result = compute_rewards(["got 0", "nope", "2!", "3"], examples(4), cfg)
    assert result.total == [1.0, 0.0, 1.0, 2.0] and not any(result.failed)


def test_async_sample_rewards_run_concurrently(user_file):
    cfg = rewards((f"{user_file}:slow_sample", {"delay": 0.2}), (f"{user_file}:slow_batch", {}))
    start = time.perf_counter()
    result = compute_rewards(["a", "bb", "ccc", "dddd", "eeeee"], examples(5), cfg)
    assert time.perf_counter() - start < 0.6  # five 0.2 s samples awaited together, not one after another
    assert result.total == [1.5, 2.5, 3.5, 4.5, 5.5]


def test_a_failing_sample_fails_alone_and_a_failing_batch_fails_all(user_file):
    result = compute_rewards(["ok", "boom", "ok"], examples(3), rewards((f"{user_file}:flaky", {})))
    assert result.failed == [False, True, False] and "RuntimeError: bad sample" in result.errors[0]
    short = compute_rewards(["a", "b"], examples(2), rewards((f"{user_file}:strict_batch", {}), ("first_integer", {})))
    assert short.failed == [False, False]


def test_a_module_on_the_path_and_an_entry_point_resolve(tmp_path, monkeypatch):
    package = tmp_path / "site"
    (package / "acme_rewards").mkdir(parents=True)
    (package / "acme_rewards" / "__init__.py").write_text("def exact(completion, example):\n    return float(completion == example.answer)\n")
    dist = package / "acme_rewards-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rewards\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[rollmill.rewards]\nacme_exact = acme_rewards:exact\n")
    monkeypatch.syspath_prepend(str(package))
    for name in ("acme_rewards:exact", "acme_exact"):
        result = compute_rewards(["0", "2"], examples(2), rewards((name, {})))
        assert result.total == [1.0, 0.0]  # the answers are "0" and "1"
    assert resolve("acme_exact", {}, "reward function") is sys.modules["acme_rewards"].exact


def test_a_task_source_from_a_file_keeps_extra_columns_for_rewards(user_file):
    train, held_out = load_task(TaskConfig(source=f"{user_file}:load"))
    assert len(train) == 8 and len(held_out) == 4
    assert train[1].prompt == "1+1=" and train[1].answer == "2" and train[1].meta == {"difficulty": "hard"}


def test_an_env_class_from_a_file(user_file):
    env = make_env(f"{user_file}:Counter", target=1)
    env.reset()
    assert env.step("up")[1:3] == (1.0, True)


def test_config_errors_name_what_was_tried(user_file, tiny_cfg):
    for functions, message in [
        ([{"name": "nope"}], "unknown reward function 'nope'; allowed: ['answer_tag'"),
        ([{"name": "missing.py:f"}], "reward function file 'missing.py' does not exist"),
        ([{"name": f"{user_file}:nothing"}], "has no attribute 'nothing'"),
        ([{"name": "no_such_module_xyz:f"}], "cannot be imported"),
        ([{"name": f"{user_file}:strict_batch", "kwargs": {"x": 1}}], "takes no argument ['x']"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            check_config(tiny_cfg(reward={"functions": functions}))
    with pytest.raises(ConfigError, match="unknown task source 'nosuch'"):
        check_config(tiny_cfg(task={"source": "nosuch"}))
    with pytest.raises(ConfigError, match="env.name"):
        check_config(tiny_cfg(env={"name": f"{user_file}:nothing"}).model_copy(update={"pipeline": "agentic"}))
    with pytest.raises(PluginError, match="package.module:attr"):
        resolve("no-colon", {}, "reward function")
