"""DPO on the policy's own samples (pipeline: dpo): verifier-picked pairs, one preference step, the run."""

import math

import pytest
import torch
from conftest import tiny_config_dict

from rollmill.config import AlgorithmConfig, ConfigError, TrainConfig, config_from_dict
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.runtime import train
from rollmill.track import read_jsonl
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.preference import pair_batches, preference_step, verified_pairs
from rollmill.train.trainer import PolicyTrainer
from rollmill.types import Row, Trajectory, Turn


def traj(group: int, index: int, reward: float, failed: bool = False, reply=(5, 6, 7)) -> Trajectory:
    """An RLVR sample: one row, one turn carrying its score."""
    turn = Turn("reply", "reply", "", reward, None, None, False, 0, "stop")
    return Trajectory(group, index, 0, rows=[Row.sampled([3, 4], list(reply), [-1.0] * len(reply))], turns=[turn],
                      failed=failed)


def test_pairs_match_best_with_worst_in_sample_order():
    groups = [[traj(0, 0, 1.0), traj(0, 1, 0.0), traj(0, 2, 1.0), traj(0, 3, 0.0), traj(0, 4, 0.5)],
              [traj(1, 0, 1.0), traj(1, 1, 1.0)],  # no spread: nothing to prefer
              [traj(2, 0, 1.0), traj(2, 1, 0.0, failed=True)],  # a failed score says nothing
              [traj(3, 0, 0.2), traj(3, 1, 0.7), traj(3, 2, 0.2)]]
    pairs = verified_pairs(groups, per_group=2)
    assert [(c.group_id, c.index, r.index) for c, r in pairs] == [(0, 0, 1), (0, 2, 3), (3, 1, 0)]
    assert len(verified_pairs(groups, per_group=1)) == 2


def test_a_preference_step_moves_chosen_up_and_rejected_down():
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=2)
    ref = build_tiny_model(len(tok), seed=2).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    replies = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 3, 5, 2, 3, 4)]
    pairs = [(traj(k, 0, 1.0, reply=replies[2 * k]), traj(k, 1, 0.0, reply=replies[2 * k + 1])) for k in range(3)]
    chosen, rejected = pair_batches(pairs, pad_id=2)
    trainer = PolicyTrainer(model, TrainConfig(lr=5e-3), AlgorithmConfig(), ref_model=ref)

    def seq_logps(batch):
        with torch.no_grad():
            return (completion_logprobs(model, batch)[0] * batch.mask).sum(-1)

    before_c, before_r = seq_logps(chosen), seq_logps(rejected)
    first = preference_step(trainer, chosen, rejected, "sigmoid", beta=0.5, label_smoothing=0.0, micro_batch_size=2)
    # policy == reference at the start: every margin is 0, so the loss is log 2 and the rewards 0
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5) and first["dpo/reward_margin"] == pytest.approx(0, abs=1e-6)
    assert first["dpo/pairs"] == 3 and first["grad_norm"] > 0
    assert (seq_logps(chosen) - before_c).sum() > 0 and (seq_logps(rejected) - before_r).sum() < 0
    second = preference_step(trainer, chosen, rejected, "sigmoid", beta=0.5, label_smoothing=0.0, micro_batch_size=3)
    assert second["dpo/loss"] < first["dpo/loss"] and second["dpo/reward_margin"] > 0


def dpo_config(tmp_path, **sections):
    return config_from_dict({**tiny_config_dict(tmp_path, **sections), "pipeline": "dpo"})


def test_a_dpo_run_trains_on_its_own_verified_pairs(tmp_path):
    cfg = dpo_config(tmp_path, dpo={"beta": 0.2}, train={"steps": 3})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(records) == 3 and sum(r["dpo/pairs"] for r in records) > 0
    trained = [r for r in records if r["dpo/pairs"] > 0]
    assert all(math.isfinite(r["dpo/loss"]) and r["grad_norm"] > 0 for r in trained)
    assert "eval/accuracy" in records[-1] and (tmp_path / "run" / "checkpoints").is_dir()


def test_the_dpo_section_belongs_to_the_dpo_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="the dpo section applies only to pipeline 'dpo'"):
        config_from_dict(tiny_config_dict(tmp_path, dpo={"beta": 0.2}))
    with pytest.raises(ConfigError, match="dpo.loss"):
        dpo_config(tmp_path, dpo={"loss": "kto"})
