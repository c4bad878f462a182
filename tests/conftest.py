import os

import pytest
import torch

from rollmill.config import config_from_dict

torch.set_num_threads(1)


def _let_pass(directory) -> None:
    os.chmod(directory, os.stat(directory).st_mode | 0o001)


@pytest.fixture(scope="session", autouse=True)
def sandbox_identity_passes_the_temp_base(tmp_path_factory):
    """bwrap runs as an unprivileged uid that must pass through every directory above a sandbox
    state root (rollmill.sandbox.bwrap), and pytest makes its temp directories 0700: open them to
    o+x (pass through, never list) so tests can keep sandbox roots under tmp_path."""
    base = tmp_path_factory.getbasetemp()
    _let_pass(base.parent)
    _let_pass(base)


@pytest.fixture(autouse=True)
def sandbox_identity_passes_tmp_path(request):
    if "tmp_path" in request.fixturenames:
        _let_pass(request.getfixturevalue("tmp_path"))


def tiny_config_dict(tmp_path, **sections) -> dict:
    """A run of a few steps on a tiny random model. The reward (the reply contains a digit) is
    frequent for a random character-level model, so advantages and gradients are non-zero."""
    base = {
        "name": "tiny",
        "model": {"source": "tiny"},
        "task": {"source": "arithmetic", "name": "add_1digit", "train_size": 64, "eval_size": 8},
        "reward": {
            "functions": [{"name": "format", "kwargs": {"pattern": ".*[0-9].*"}}, {"name": "first_integer"}],
        },
        "rollout": {"prompts_per_step": 2, "group_size": 4, "sampling": {"max_new_tokens": 6}},
        "train": {"steps": 4, "lr": 1e-2, "micro_batch_size": 3},
        "checkpoint": {"every": 2},
        "eval": {"every": 2},
        "log": {"run_root": str(tmp_path / "runs"), "progress": False, "trackers": []},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(**sections):
        return config_from_dict(tiny_config_dict(tmp_path, **sections))

    return make


@pytest.fixture
def straight_and_resumed(tmp_path):
    """Run `cfg` straight, and again as half the steps + --resume; return both runs' deterministic metrics."""
    from rollmill.runtime import train
    from rollmill.track import deterministic_metrics

    def run(cfg):
        train(cfg, tmp_path / "straight")
        half = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": cfg.train.steps // 2})})
        train(half, tmp_path / "split")
        train(cfg, tmp_path / "split", resume=True)
        return deterministic_metrics(tmp_path / "straight" / "metrics.jsonl"), deterministic_metrics(
            tmp_path / "split" / "metrics.jsonl")

    return run


@pytest.fixture
def make_job():
    """Build an RL job on the local backend (closed after the test): `job.train_step()` runs one step,
    `job.roles.learner` is the learner."""
    from rollmill.runtime.local import LocalRoles
    from rollmill.runtime.rl import RLJob

    jobs = []

    def make(cfg, run_dir):
        jobs.append(RLJob(cfg, run_dir, LocalRoles))
        return jobs[-1]

    yield make
    for job in jobs:
        job.close()
