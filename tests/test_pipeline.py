import json

import pytest
import torch

from rollmill.cli import main
from rollmill.config import dump_config
from rollmill.runtime import train
from rollmill.tasks import DataError
from rollmill.track import deterministic_metrics, read_jsonl


def test_tiny_run_writes_every_artifact(tiny_cfg, tmp_path):
    cfg = tiny_cfg(log={"trackers": ["tensorboard"]})
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward/mean", "response_length/mean", "loss", "entropy", "clip_fraction", "grad_norm",
                "time/rollout_s", "time/train_s", "throughput/tokens_per_s"):
        assert all(key in r for r in steps), key
    assert records[0]["step"] == 0 and "eval/accuracy" in records[0]
    assert "eval/accuracy" in steps[1] and "eval/accuracy" in steps[3]
    assert sum(r["reward/mean"] for r in steps) > 0, "the tiny reward should fire"
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and {"prompt", "completion", "reward", "answer"} <= set(samples[0])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "curves.png").stat().st_size > 1000
    assert any((run_dir / "tensorboard").iterdir())
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_000002", "step_000004"]
    assert {"model.safetensors", "trainer.pt", "state.json"} <= {p.name for p in ckpts[-1].iterdir()}
    assert result.eval_before is not None and result.eval_after is not None


def test_resume_reproduces_a_straight_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    straight = tmp_path / "straight"
    train(cfg, straight)
    split = tmp_path / "split"
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2})}), split)
    train(cfg, split, resume=True)
    a = deterministic_metrics(straight / "metrics.jsonl")
    b = deterministic_metrics(split / "metrics.jsonl")
    assert len(a) == 5 and a == b
    assert read_jsonl(straight / "samples.jsonl") == read_jsonl(split / "samples.jsonl")
    from safetensors.torch import load_file

    final_a = load_file(straight / "checkpoints" / "step_000004" / "model.safetensors")
    final_b = load_file(split / "checkpoints" / "step_000004" / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_after_a_kill_drops_the_lost_steps(tiny_cfg, tmp_path, make_job):
    from rollmill.track import RunLogger

    cfg = tiny_cfg(checkpoint={"every": 2})
    run_dir = tmp_path / "run"
    job = make_job(cfg, run_dir)
    run_dir.mkdir()
    logger = RunLogger(run_dir)
    logger.log_metrics({"step": 0})
    for _ in range(3):  # checkpoint at 2, then "killed" after step 3
        record, _ = job.train_step()
        logger.log_metrics(record)
        if job.step == 2:
            job.save({})
    resumed = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2})}), run_dir, resume=True)
    assert resumed.steps == 2
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]


def test_reward_that_raises_marks_samples_failed_and_run_goes_on(tiny_cfg, tmp_path):
    cfg = tiny_cfg(reward={"functions": [{"name": "format", "kwargs": {"pattern": "("}}]}, train={"steps": 1})
    train(cfg, tmp_path / "run")
    step = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/failed" in r][0]
    assert step["reward/failed"] == 8 and step["reward/mean"] == 0


def test_malformed_data_file_fails_before_model_loads(tiny_cfg, tmp_path, monkeypatch):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + json.dumps({"answer": "2"}) + "\n")
    cfg = tiny_cfg(task={"source": "file", "path": str(data), "eval_size": 1})
    for role in ("learner", "worker"):
        monkeypatch.setattr(f"rollmill.runtime.{role}.load_model", lambda *_: pytest.fail("model loaded before data check"))
    with pytest.raises(DataError) as err:
        train(cfg, tmp_path / "run")
    assert "bad.jsonl" in str(err.value) and "2" in str(err.value) and "prompt" in str(err.value)


def test_cli_train_eval_plot(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(train={"steps": 2})
    config_path = tmp_path / "tiny.yaml"
    dump_config(cfg, config_path)
    run_dir = tmp_path / "cli-run"
    assert main(["train", str(config_path), "--run-dir", str(run_dir), "--set", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "held-out before: accuracy=" in out and "held-out after:  accuracy=" in out
    assert main(["eval", str(run_dir), "--n", "4", "--temperature", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "step_000002" in out and "pass@2=" in out and "pass@4=" in out
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "curves.png").is_file()
    assert main(["train", str(config_path), "--set", "algorithm.name=nope"]) == 2
