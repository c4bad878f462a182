from pathlib import Path

import pytest

from rollmill.config import load_config
from rollmill.envs import make_env
from rollmill.tasks import load_task

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_loads_and_its_data_loads(path, monkeypatch):
    monkeypatch.chdir(path.parent.parent)  # data paths in examples are relative to the repository root
    cfg = load_config(path)
    if cfg.pipeline == "agentic":
        env = make_env(cfg.env.name, **cfg.env.kwargs)
        observation, _ = env.reset(seed=0)
        assert isinstance(observation, str) and observation and env.instructions
        return
    train, held_out = load_task(cfg.task)
    assert train and held_out
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
