"""Preplan-and-anchor credit wired into training: extra attention forward, amplified advantages."""

import math

import pytest
import torch

from rollmill.config import AlgorithmConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.types import Row
from rollmill.train import build_batch
from rollmill.train.anchor_credit import anchor_scaled_advantages, attention_maps


def batch_and_model():
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    g = torch.Generator().manual_seed(0)
    comps = [Row.sampled(torch.randint(3, 90, (4,), generator=g).tolist(), torch.randint(3, 90, (n,), generator=g).tolist(),
                         [-1.0] * n) for n in (10, 6, 10, 3)]
    return model, build_batch(comps, torch.tensor([1.0, -1.0, 0.5, 2.0]), pad_id=2)


def test_attention_maps_are_probabilities_and_sdpa_is_restored():
    model, batch = batch_and_model()
    maps = attention_maps(model, batch, layer=-1, micro_batch_size=3)
    assert maps.shape == (4, 4, 14, 14)
    rows = maps.sum(-1)[batch.attention_mask.bool()[:, None, :].expand(-1, 4, -1)]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert model.config._attn_implementation != "eager"


@pytest.mark.parametrize("mode", ["waad", "fai", "preplan_anchor"])
def test_advantages_are_amplified_on_the_top_fraction_of_each_reply(mode):
    model, batch = batch_and_model()
    algo = AlgorithmConfig(anchor_credit=mode, anchor_kappa=0.5, anchor_top_q=0.25, anchor_window=4)
    adv = anchor_scaled_advantages(model, batch, algo, micro_batch_size=4)
    base = batch.advantages[:, None] * batch.mask
    ratio = (adv * batch.mask) / torch.where(base == 0, torch.ones_like(base), base)
    boosted = ((ratio - 1.5).abs() < 1e-6) & batch.mask.bool()
    assert torch.all(((ratio - 1.0).abs() < 1e-6) | boosted | ~batch.mask.bool())
    expected = [math.ceil(0.25 * n) for n in (10, 6, 10, 3)]
    counts = boosted.sum(-1).tolist()
    assert counts == expected if mode != "preplan_anchor" else all(e <= c <= 2 * e for e, c in zip(expected, counts))


def test_training_with_anchor_credit_runs(tiny_cfg, tmp_path, make_job):
    cfg = tiny_cfg(algorithm={"anchor_credit": "preplan_anchor"}, eval={"before": False})
    job = make_job(cfg, tmp_path / "run")
    model = job.roles.learner.model
    before = [p.detach().clone() for p in model.parameters()]
    record, _ = job.train_step()
    assert math.isfinite(record["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_agentic_rows_gate_only_the_policys_tokens():
    """An episode row interleaves replies (mask 1) with env text (mask 0): the top fraction is taken
    over each row's reply tokens alone, and env text keeps its advantage of 0."""
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    g = torch.Generator().manual_seed(1)
    rows, advs = [], []
    for replies, env in ((4, 5), (6, 2), (3, 7)):
        row = Row(torch.randint(3, 90, (3,), generator=g).tolist())
        for turn in range(2):
            row.append_sampled(torch.randint(3, 90, (replies,), generator=g).tolist(), [-1.0] * replies, [0] * replies,
                               turn)
            row.append_env(torch.randint(3, 90, (env,), generator=g).tolist())
        rows.append(row)
        advs.append([1.0 if m else 0.0 for m in row.mask])
    batch = build_batch(rows, advs, pad_id=2)
    algo = AlgorithmConfig(anchor_credit="fai", anchor_kappa=1.0, anchor_top_q=0.3)
    adv = anchor_scaled_advantages(model, batch, algo, micro_batch_size=2)
    mask = batch.mask.bool()
    assert torch.all(adv[~mask] == 0)
    assert torch.all((adv[mask] == 1.0) | (adv[mask] == 2.0))
    assert (adv == 2.0).sum(-1).tolist() == [math.ceil(0.3 * 2 * n) for n in (4, 6, 3)]
