"""A run directory holds one run: refused without --resume, replaced with --overwrite; resume survives a
torn metrics line, a corrupt latest checkpoint and a kill before the first checkpoint; checkpoint files
get ordinary permissions."""

from __future__ import annotations

import json
import os

import pytest

from rollmill.cli import main
from rollmill.config import ConfigError, dump_config
from rollmill.runtime import train
from rollmill.train import list_checkpoints


def steps_logged(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def short(tiny_cfg, steps=2, every=1):
    return tiny_cfg(train={"steps": steps}, checkpoint={"every": every, "keep": 5}, eval={"before": True, "every": 0})


def test_a_second_run_into_the_same_directory_is_refused_unless_overwritten(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(short(tiny_cfg, steps=3), run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(short(tiny_cfg), run)
    assert steps_logged(run) == [0, 1, 2, 3]  # untouched by the refused run
    train(short(tiny_cfg), run, overwrite=True)
    assert steps_logged(run) == [0, 1, 2]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000001", "step_000002"]
    assert (run / "notes.txt").read_text() == "mine"  # only what a run writes is removed


def test_the_cli_refuses_with_exit_code_2(tiny_cfg, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    dump_config(short(tiny_cfg, steps=1), cfg_path)
    args = ["train", str(cfg_path), "--run-dir", str(tmp_path / "run")]
    assert main(args) == 0
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_resume_drops_a_torn_last_metrics_line(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(short(tiny_cfg, steps=2), run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/me')  # killed mid-write
    train(short(tiny_cfg, steps=3), run, resume=True)
    assert steps_logged(run) == [0, 1, 2, 3]


def test_resume_falls_back_from_a_corrupt_latest_checkpoint(tiny_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    train(short(tiny_cfg, steps=2), run)
    latest = list_checkpoints(run / "checkpoints")[-1]
    (latest / "model.safetensors").write_bytes(b"\0" * 64)
    train(short(tiny_cfg, steps=3), run, resume=True)
    assert "cannot be read" in caplog.text and "step_000002" in caplog.text
    assert steps_logged(run) == [0, 1, 2, 3]  # step 2 redone from step 1's checkpoint, logged once


def test_a_run_killed_before_its_first_checkpoint_restarts_without_a_second_step_0(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(short(tiny_cfg, steps=1, every=0), run)
    for ckpt in list_checkpoints(run / "checkpoints"):  # as if killed after step 0's eval
        import shutil

        shutil.rmtree(ckpt)
    train(short(tiny_cfg, steps=1, every=0), run, resume=True)
    assert steps_logged(run) == [0, 1]


def test_checkpoint_files_get_the_permissions_of_any_new_file(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(short(tiny_cfg, steps=1), run)
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_resume_refuses_settings_that_cannot_change_and_applies_the_others(tiny_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    train(short(tiny_cfg, steps=2), run)
    lr = tiny_cfg(train={"steps": 3, "lr": 5e-3}, checkpoint={"every": 1, "keep": 5})
    with pytest.raises(ConfigError, match=r"cannot change mid-run: train.lr: 0.01 -> 0.005"):
        train(lr, run, resume=True)
    with pytest.raises(ConfigError, match="rollout.group_size"):
        train(tiny_cfg(train={"steps": 3}, rollout={"group_size": 2}, checkpoint={"every": 1, "keep": 5}), run,
              resume=True)
    caplog.set_level("INFO")
    train(short(tiny_cfg, steps=3), run, resume=True)
    assert "train.steps changes from 2 to 3" in caplog.text
    assert steps_logged(run) == [0, 1, 2, 3]
