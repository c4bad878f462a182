"""Streamed training: `begin_stream`, `add_groups` in any order and chunking, `finish_stream` give the
update `Learner.train` gives on the same groups; configs without such a form are refused by name."""

import random

import pytest
import torch

from rollmill.runtime.learner import Learner, streaming_blockers
from rollmill.types import Row, Trajectory, Turn


def make_groups(vocab: int, seed: int, version: int, prompts: int = 7, size: int = 4) -> list[list[Trajectory]]:
    """`prompts` groups of `size` samples of random lengths and rewards, sampled by weights `version`;
    group 0 is all-correct, so the difficulty filter drops it and the loss denominators differ from
    the row count."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        group = []
        for i in range(size):
            n = int(torch.randint(1, 7, (1,), generator=g))
            tokens = torch.randint(3, vocab, (n,), generator=g).tolist()
            logprobs = (-4.6 + 0.1 * torch.randn(n, generator=g)).tolist()
            reward = 1.0 if p == 0 else float(torch.randint(0, 2, (1,), generator=g))
            turn = Turn("", "", "", reward, None, None, False, 0, "stop")
            row = Row.sampled(prompt, tokens, logprobs, version)
            group.append(Trajectory(p, i, p, [row], [turn], end_reason="stop"))
        groups.append(group)
    return groups


def chunked(groups, seed: int = 1):
    """The groups shuffled, in chunks of 1 to 3: finished groups arrive in any order."""
    rng = random.Random(seed)
    order = groups[:]
    rng.shuffle(order)
    chunks = []
    while order:
        k = rng.randint(1, 3)
        chunks.append(order[:k])
        order = order[k:]
    return chunks


def stream_config(tiny_cfg, loss_agg: str, track_kl: bool, kl_coef: float = 0.0):
    return tiny_cfg(
        algorithm={"loss_agg": loss_agg, "track_kl": track_kl, "kl_coef": kl_coef},
        rollout={"prompts_per_step": 7, "group_size": 4, "sampling": {"max_new_tokens": 6},
                 "logprob_check": "off"},  # the made-up behaviour log-probs are not the model's
        filters={"difficulty_low": 0.0, "difficulty_high": 1.0},
        train={"micro_batch_size": 3, "lr": 1e-3},
    )


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the scale max |b| of the tensor."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("loss_agg, track_kl, kl_coef", [
    ("token-mean", False, 0.0),
    ("token-mean", True, 0.0),
    ("seq-mean-token-mean", True, 0.1),  # the reference KL in the loss too
    ("seq-mean-token-sum", False, 0.0),
    ("seq-mean-token-sum-norm", True, 0.0),
])
def test_streamed_update_equals_the_plain_one(tiny_cfg, loss_agg, track_kl, kl_coef):
    """After one identical plain update (so the policy has left the reference and Adam has state), a
    streamed update over shuffled chunks of 1-3 groups vs `train` on the same groups.

    Only the float summation order differs (chunked vs whole-batch micro-batches, the gradient sum
    scaled once vs each micro-batch loss), so the bounds are float32 noise, relative to the largest
    absolute value of each tensor: gradients (the clipped ones the optimizer used) 3e-6, parameters
    5e-6 (Adam's step divides by the gradient's own size, so where that is tiny it amplifies noise);
    metrics 1e-6 relative, except the KL (a small difference of log-probs: 2e-5) and the loss (a sum
    of signed advantages that largely cancel: 1e-6 absolute). Largest differences seen over 50 runs
    (10 seeds x these 5 cases): gradients 1.0e-6, parameters 2.6e-6, metrics 3.2e-7 relative, KL
    6.1e-6 relative, loss 3.3e-7 absolute."""
    cfg = stream_config(tiny_cfg, loss_agg, track_kl, kl_coef)
    plain, streamed = Learner(cfg), Learner(cfg)
    assert streamed.can_stream
    vocab = len(plain.model.get_input_embeddings().weight)
    for learner in (plain, streamed):
        learner.train(make_groups(vocab, seed=1, version=0))
    groups = make_groups(vocab, seed=2, version=1)
    expected = plain.train(groups)
    streamed.begin_stream()
    chunks = chunked(groups)
    assert len(chunks) > 2
    for chunk in chunks:
        streamed.add_groups(chunk)
    got = streamed.finish_stream()
    assert streamed.version == plain.version == 2
    for (name, a), b in zip(streamed.model.named_parameters(), plain.model.parameters()):
        assert relative_diff(a.grad, b.grad) <= 3e-6, name
        assert relative_diff(a.detach(), b.detach()) <= 5e-6, name
    assert set(got) == set(expected)
    checked = ("loss", "entropy", "clip_fraction", "approx_kl", "ratio", "grad_norm", "lr", "logprob_mismatch")
    tolerance = {"loss": {"abs": 1e-6}, "kl": {"rel": 2e-5}}
    for key in checked + (("kl",) if track_kl else ()):
        assert got[key] == pytest.approx(expected[key], **tolerance.get(key, {"rel": 1e-6})), key
    assert expected["grad_norm"] > 0 and (not track_kl or expected["kl"] > 0)


@pytest.mark.parametrize("sections, reason", [
    ({"algorithm": {"whiten_advantages": True}}, "whiten_advantages"),
    ({"algorithm": {"advantage": "gae"}}, "'gae' needs a critic"),
    ({"algorithm": {"advantage": "reinforce_pp"}}, "'reinforce_pp' is not computed per group"),
    ({"algorithm": {"advantage": "normalized", "norm_std": "batch"}}, "['batch'] statistics"),
    ({"algorithm": {"advantage": "normalized", "norm_mean": "running"}}, "['running'] statistics"),
    ({"algorithm": {"kl_placement": "reward", "kl_coef": 0.1}}, "kl_placement 'reward'"),
    ({"algorithm": {"anchor_credit": "waad"}}, "credit 'waad'"),
    ({"algorithm": {"mismatch_ratio_bounds": (0.5, 2.0)}}, "mismatch_ratio_bounds"),
    ({"train": {"ppo_epochs": 2}}, "ppo_epochs=2"),
    ({"train": {"mini_batch_size": 4}}, "mini_batch_size=4"),
])
def test_configs_without_a_streamed_form_are_named(tiny_cfg, sections, reason):
    assert streaming_blockers(tiny_cfg()) == []
    blockers = streaming_blockers(tiny_cfg(**sections))
    assert len(blockers) == 1 and reason in blockers[0], blockers


def test_begin_stream_refuses_with_the_reason(tiny_cfg):
    learner = Learner(tiny_cfg(algorithm={"whiten_advantages": True}))
    assert not learner.can_stream
    with pytest.raises(ValueError, match="whiten_advantages"):
        learner.begin_stream()


def test_finishing_an_empty_stream_is_an_empty_update(tiny_cfg):
    """Like `train([])`: the version advances, and weights, optimizer state and LR schedule stay."""
    streamed = Learner(tiny_cfg())
    before = {k: v.clone() for k, v in streamed.model.state_dict().items()}
    streamed.begin_stream()
    streamed.add_groups([])
    assert streamed.finish_stream() == Learner(tiny_cfg()).train([]) == {}
    assert streamed.version == 1
    assert all(torch.equal(before[k], v) for k, v in streamed.model.state_dict().items())
    assert streamed.trainer.optimizer.state_dict()["state"] == {}
    assert streamed.trainer.scheduler.last_epoch == 0


def test_a_streamed_synchronous_step_samples_the_same_and_updates_the_same(tiny_cfg, make_job, tmp_path):
    """The driver streams each completed group to the learner: the step's samples are the same as
    without streaming, and the gradients the update applied agree within the bound of the update test
    above (3e-6 of each tensor's scale; the weights themselves differ more after a first Adam step,
    whose size does not depend on the gradient's, so noise in a near-zero gradient moves them fully)."""
    cfg = tiny_cfg(rollout={"prompts_per_step": 3, "group_size": 4, "sampling": {"max_new_tokens": 6}},
                   train={"lr": 1e-3})
    streamed = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"streamed_training": True})})
    plain_job, streamed_job = make_job(cfg, tmp_path / "plain"), make_job(streamed, tmp_path / "streamed")
    (plain, plain_samples), (stream, stream_samples) = plain_job.train_step(), streamed_job.train_step()
    assert plain_samples == stream_samples and plain["reward/mean"] == stream["reward/mean"]
    assert plain["loss"] == pytest.approx(stream["loss"], abs=1e-6)
    new = dict(streamed_job.roles.learner.model.named_parameters())
    for name, p in plain_job.roles.learner.model.named_parameters():
        assert relative_diff(new[name].grad, p.grad) <= 3e-6, name


def test_a_config_without_a_streamed_update_is_refused_when_the_run_starts(tiny_cfg, tmp_path):
    from rollmill.config import ConfigError
    from rollmill.runtime.local import LocalRoles
    from rollmill.runtime.rl import RLJob

    cfg = tiny_cfg(runtime={"streamed_training": True}, algorithm={"whiten_advantages": True})
    with pytest.raises(ConfigError, match="whiten_advantages"):
        RLJob(cfg, tmp_path / "run", LocalRoles)
    with pytest.raises(ConfigError, match="async.max_staleness"):
        tiny_cfg(runtime={"streamed_training": True}, **{"async": {"max_staleness": 1}})
