"""Every preset YAML in examples/presets trains 2 steps on a tiny model: finite loss, weights move."""

from pathlib import Path

import pytest
import torch

from rollmill.checks import load_run_config
from rollmill.cli import main
from rollmill.config.presets import ALGORITHMS

PRESETS = sorted((Path(__file__).parent.parent / "examples" / "presets").glob("*.yaml"))
TINY = [
    "model.source=tiny", "task.name=add_1digit", "task.train_size=64", "task.eval_size=8",
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.sampling.max_new_tokens=6",
    "reward.functions=[{name: format, kwargs: {pattern: '.*[0-9].*'}}]", "train.lr=1e-2", "train.micro_batch_size=4",
    "eval.before=false", "log.trackers=[]", "log.progress=false",
]


def test_every_preset_has_an_example():
    assert {p.stem for p in PRESETS} == set(ALGORITHMS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_two_steps(path, tmp_path, make_job):
    cfg = load_run_config(path, TINY + [f"log.run_root={tmp_path}"])
    for key, value in ALGORITHMS[path.stem].settings.items():
        assert getattr(cfg.algorithm, key) == value
    job = make_job(cfg, tmp_path / "run")
    model = job.roles.learner.model
    before = [p.detach().clone() for p in model.parameters()]
    records = [job.train_step()[0] for _ in range(2)]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_algos_command_lists_every_registry(capsys):
    assert main(["algos"]) == 0
    out = capsys.readouterr().out
    for name in ["dapo", "rloo", "lite_ppo", "gspo_token", "cispo", "k3", "seq-mean-token-sum-norm"]:
        assert f"  {name} " in out
