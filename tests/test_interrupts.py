"""A run that is killed, interrupted or keeps failing loses nothing it has checkpointed."""

import signal
import subprocess
import sys
import time

import pytest

from rollmill.config import dump_config
from rollmill.runtime import train
from rollmill.track import read_jsonl
from rollmill.train import list_checkpoints


def start_run(cfg, tmp_path, run_dir):
    path = tmp_path / "cfg.yaml"
    dump_config(cfg, path)
    cmd = [sys.executable, "-m", "rollmill.cli", "train", str(path), "--run-dir", str(run_dir)]
    return cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run_dir, proc, min_step=4, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if ckpts and int(ckpts[-1].name.split("_")[1]) >= min_step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def test_sigkill_then_resume_finishes_without_gaps_or_duplicates(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train={"steps": 40}, checkpoint={"every": 2}, eval={"every": 0})
    run_dir = tmp_path / "run"
    cmd, proc = start_run(cfg, tmp_path, run_dir)
    wait_for_checkpoint(run_dir, proc)
    proc.kill()
    proc.wait()
    killed_at = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl"))
    saved = int(list_checkpoints(run_dir / "checkpoints")[-1].name.split("_")[1])
    assert 4 <= saved <= killed_at < 40
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"(step {saved})" in done.stderr  # picks up at the last checkpoint: only later steps are redone
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(0, 41))


def test_first_ctrl_c_finishes_the_step_and_checkpoints(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train={"steps": 10_000}, checkpoint={"every": 2}, eval={"every": 0})
    run_dir = tmp_path / "run"
    _, proc = start_run(cfg, tmp_path, run_dir)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "continue with --resume" in out
    last = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl"))
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{last:06d}"


def test_a_reward_failing_on_every_sample_stops_the_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        reward={"functions": [{"name": "format", "kwargs": {"pattern": "("}}], "max_all_failed_steps": 2},
        train={"steps": 10},
    )
    with pytest.raises(RuntimeError, match="every sample for 2 steps.*format: error"):
        train(cfg, tmp_path / "run")
