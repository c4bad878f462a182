"""The cascade recipe (`pipeline: cascade`): SFT, a difficulty probe routing each training example by its
pass rate, a second SFT on the hard rows and RL on the learnable ones, each stage in its own run directory;
resume skips finished stages; empty routes skip their stage; config and stage errors name where."""

import json
import logging
from types import SimpleNamespace

import pytest

from rollmill.cli import main
from rollmill.config import ConfigError, config_from_dict, dump_config, load_config
from rollmill.config.cascade import ProbeConfig
from rollmill.runtime import evaluate, train
from rollmill.runtime.cascade_probe import pass_rate_histogram, verifier_scores
from rollmill.tasks import load_task
from rollmill.track import read_jsonl
from conftest import tiny_config_dict

# Scores a reply by its example's answer alone, so every example's pass rate is known in advance whatever
# the random tiny model says: answers 0 mod 3 always pass (easy), 1 mod 3 never (hard), 2 mod 3 half (learnable).
VERIFIER = """
def credit(completion, example):
    return (1.0, 0.0, 0.5)[int(example.answer) % 3]


def always(completion, example):
    return 1.0
"""
EXPECTED = {0: (1.0, "easy"), 1: (0.0, "hard"), 2: (0.5, "learnable")}


def cascade_dict(tmp_path, verifier: str = "credit", **cascade) -> dict:
    path = tmp_path / "verifier.py"
    path.write_text(VERIFIER)
    tree = tiny_config_dict(tmp_path, task={"train_size": 18, "eval_size": 6},
                            reward={"functions": [{"name": f"{path}:{verifier}"}]},
                            train={"steps": 2}, checkpoint={"every": 0}, eval={"every": 0})
    return {**tree, "name": "casc", "pipeline": "cascade", "sft": {"examples_per_step": 4},
            "cascade": {"probe": {"k": 2, "max_examples": None}, **cascade}}


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_verifier_scores_are_each_groups_samples_in_order_a_failed_one_scoring_zero():
    def traj(group, index, value, failed=False):
        return SimpleNamespace(group_id=group, index=index, failed=failed, info={"reward_terms": {"v": value}})

    trajs = [traj(7, 1, 0.25), traj(3, 0, 1.0), traj(7, 0, 0.75), traj(3, 1, 1.0, failed=True)]
    assert verifier_scores(trajs, [3, 7], "v") == [[1.0, 0.0], [0.75, 0.25]]


def test_routes_split_at_the_thresholds_easy_first():
    probe = ProbeConfig(easy=0.75, hard=0.25)
    assert [probe.route(p) for p in (0.0, 0.25, 0.5, 0.74, 0.75, 1.0)] == [
        "hard", "hard", "learnable", "learnable", "easy", "easy"]
    assert pass_rate_histogram([0.0, 0.5, 0.5, 1.0]) == {"0.00": 1, "0.50": 2, "1.00": 1}
    assert pass_rate_histogram([i / 20 for i in range(20)])["0.0-0.1"] == 2


def test_a_cascade_routes_by_pass_rate_and_each_stage_starts_from_the_last_ones_checkpoint(tmp_path, caplog):
    tree = cascade_dict(tmp_path, rl={"overrides": {"train.steps": 4, "checkpoint.every": 2}})
    cfg = config_from_dict(tree)
    run = tmp_path / "run"
    result = train(cfg, run)
    sft, probe, sft2, rl = (run / s for s in ("1-sft", "2-probe", "3-sft2", "4-rl"))
    assert result.run_dir == run.resolve() and result.steps == 2 + 2 + 4

    routing = rows(probe / "routing.jsonl")
    train_split, eval_split = load_task(cfg.task)
    assert [r["prompt"] for r in routing] == [e.prompt for e in train_split]
    for r in routing:
        credit, route = EXPECTED[int(r["answer"]) % 3]
        assert r["scores"] == [credit, credit] and r["pass_rate"] == credit and r["route"] == route
    for route in ("hard", "learnable"):
        want = [(r["prompt"], r["answer"]) for r in routing if r["route"] == route]
        assert want and [(r["prompt"], r["answer"]) for r in rows(probe / f"{route}.jsonl")] == want
    assert [r["prompt"] for r in rows(probe / "eval.jsonl")] == [e.prompt for e in eval_split]
    assert "| hard | <= 0 |" in (probe / "routing.md").read_text()

    sft_ckpt, sft2_ckpt = sft / "checkpoints/step_000002", sft2 / "checkpoints/step_000002"
    stage3, stage4 = load_config(sft2 / "config.yaml"), load_config(rl / "config.yaml")
    assert (stage3.pipeline, stage3.task.path, stage3.model.path) == ("sft", str(probe / "hard.jsonl"), str(sft_ckpt))
    assert (stage4.pipeline, stage4.task.path, stage4.model.path) == ("rlvr", str(probe / "learnable.jsonl"),
                                                                      str(sft2_ckpt))
    assert stage4.task.eval_path == str(probe / "eval.jsonl") and stage4.train.steps == 4
    # the later stages trained on the routed rows: every training prompt they sampled was one of them
    learnable = {r["prompt"] for r in routing if r["route"] == "learnable"}
    assert {s["prompt"] for s in read_jsonl(rl / "samples.jsonl") if s["step"] > 0} <= learnable

    summary = json.loads((run / "cascade.json").read_text())
    assert summary["final_checkpoint"] == str(rl / "checkpoints/step_000004")
    assert set(summary["accuracy"]) == {"base", "1-sft", "3-sft2", "4-rl"}
    assert [s["status"] for s in summary["stages"]] == ["trained", "routed", "trained", "trained"]
    assert summary["stages"][1]["model_folder"] == str(sft_ckpt)  # the probe sampled the SFT model
    assert summary["stages"][1]["routes"] == {k: sum(r["route"] == k for r in routing) for k in ("easy", "learnable", "hard")}

    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, run)
    with pytest.raises(ConfigError, match="--resume with train.steps 2 -> 3"):
        train(config_from_dict({**tree, "train": {**tree["train"], "steps": 3}}), run, resume=True)
    finished = {p: p.stat().st_mtime_ns for p in (sft / "metrics.jsonl", sft2 / "metrics.jsonl", probe / "routing.jsonl")}
    (rl / "checkpoints/step_000004").rename(tmp_path / "moved")  # the RL stage as if killed after step 2
    caplog.set_level(logging.INFO)
    train(cfg, run, resume=True)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert f"resumed from {rl / 'checkpoints/step_000002'}" in caplog.text
    assert "cascade stage 1-sft: finished earlier" in caplog.text
    assert (rl / "checkpoints/step_000004/state.json").is_file()


def test_empty_routes_skip_their_stages_and_the_last_trained_stage_is_final(tmp_path, caplog):
    cfg = config_from_dict(cascade_dict(tmp_path, verifier="always"))
    caplog.set_level(logging.INFO)
    result = train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run/cascade.json").read_text())
    assert summary["final_checkpoint"] == str(tmp_path / "run/1-sft/checkpoints/step_000002")
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("1-sft", "trained"), ("2-probe", "routed"), ("3-sft2", "skipped"), ("4-rl", "skipped")]
    assert "cascade stage 4-rl skipped: the probe routed no example to it" in caplog.text
    assert not (tmp_path / "run/4-rl").exists() and result.steps == 2


def test_the_cli_prints_each_stages_accuracy_and_evaluates_and_exports_the_final_checkpoint(tmp_path, capsys):
    dump_config(config_from_dict(cascade_dict(tmp_path, verifier="always")), tmp_path / "cascade.yaml")
    run, final = tmp_path / "run", tmp_path / "run/1-sft/checkpoints/step_000002"  # only 1-sft trains
    assert main(["train", str(tmp_path / "cascade.yaml"), "--run-dir", str(run)]) == 0
    printed = capsys.readouterr().out
    accuracy = json.loads((run / "cascade.json").read_text())["accuracy"]
    assert f"accuracy by stage: base={accuracy['base']:.3f} 1-sft={accuracy['1-sft']:.3f}\n" in printed
    assert f"final checkpoint: {final}\n" in printed
    assert main(["eval", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"{final}: 6 held-out prompts")
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().out.startswith(f"{final} -> ") and (tmp_path / "exported/config.json").is_file()


def test_a_lora_stage_is_merged_into_the_folder_the_next_stage_starts_from(tmp_path):
    tree = cascade_dict(tmp_path, sft2={"enabled": False})
    cfg = config_from_dict({**tree, "model": {**tree["model"], "lora": {"rank": 4}}})
    train(cfg, tmp_path / "run")
    merged = tmp_path / "run/1-sft/merged"
    assert (merged / "config.json").is_file() and not (tmp_path / "run/1-sft/checkpoints/step_000002/config.json").exists()
    stage4 = load_config(tmp_path / "run/4-rl/config.yaml")
    assert (stage4.model.source, stage4.model.path, stage4.model.lora.rank) == ("hf_dir", str(merged), 4)
    summary = json.loads((tmp_path / "run/cascade.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("1-sft", "trained"), ("2-probe", "routed"), ("3-sft2", "skipped"), ("4-rl", "trained")]


@pytest.mark.parametrize("cascade, message", [
    ({"rl": {"overrides": {"task.path": "x.jsonl"}}}, r"cascade.rl.overrides: \['task.path'\] are set by the cascade"),
    ({"sft2": {"overrides": {"model": {"path": "m"}}}}, r"\['model.path'\] are set by the cascade"),
    ({"probe": {"easy": 0.5, "hard": 0.5}}, r"cascade.probe.hard \(0.5\) must be below cascade.probe.easy"),
    ({"rl": {"overrides": {"train": {"lr": -1}}}}, r"cascade stage 4-rl .*train.lr = -1"),
    ({"sft": {"overrides": {"sft.max_seq_len": 1}}}, r"cascade stage 1-sft .*sft.max_seq_len = 1"),
    ({"sft2": {"overrides": {"sft.path": "chat.jsonl"}}}, r"stage 3 trains on the probe's hard rows"),
    ({"rl": {"overrides": {"train.steps": 2, "train": {"steps": 3}}}}, r"'train.steps' is given twice"),
])
def test_config_errors_name_the_key_and_the_stage(tmp_path, cascade, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cascade_dict(tmp_path, **cascade))


def test_the_cascade_section_needs_pipeline_cascade(tmp_path):
    tree = {**cascade_dict(tmp_path), "pipeline": "rlvr", "sft": {}}
    with pytest.raises(ConfigError, match="the cascade section applies only to pipeline 'cascade'"):
        config_from_dict(tree)


def test_eval_scores_a_cascade_config_as_its_rl_stage(tmp_path):
    cfg = config_from_dict(cascade_dict(tmp_path))
    metrics, prompts = evaluate(cfg)
    credit = [EXPECTED[int(e.answer) % 3][0] for e in load_task(cfg.task)[1]]
    assert prompts == 6 and metrics["eval/reward"] == pytest.approx(sum(credit) / 6)


def test_a_registry_error_in_a_later_stage_fails_before_the_first_stage(tmp_path):
    cfg = config_from_dict(cascade_dict(tmp_path, rl={"overrides": {"algorithm.loss": "nope"}}))
    with pytest.raises(ConfigError, match="cascade stage 4-rl .*algorithm.loss = 'nope'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failing_stage_names_itself_and_its_run_directory(tmp_path, monkeypatch):
    def broken(cfg, run_dir, resume):
        raise OSError("disk full")

    monkeypatch.setattr("rollmill.runtime.cascade.train", broken)
    run = tmp_path / "run"
    (run / "4-rl").mkdir(parents=True)  # a previous cascade's, which --overwrite removes
    with pytest.raises(RuntimeError, match=f"cascade stage 1-sft failed \\(OSError: disk full\\); its run directory "
                                           f"{run.resolve() / '1-sft'} and every earlier stage are kept"):
        train(config_from_dict(cascade_dict(tmp_path)), run, overwrite=True)
    assert not (run / "4-rl").exists() and (run / "config.yaml").is_file()
