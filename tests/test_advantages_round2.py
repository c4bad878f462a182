"""Algorithms, round two, advantage side: OPO, ReMax (with its greedy sample), per-reward-function
normalization (GDPO), the std epsilon, REINFORCE++'s token form and the value-loss aggregation.

Every expected number is worked out by hand in docs/algorithms.md Appendix C (asserted to 1e-5)."""

import re
from types import SimpleNamespace

import pytest
import torch

from rollmill.algos import ADVANTAGE_NAMES, GROUP_BASELINE_ADVANTAGES
from rollmill.algos.advantages import ADVANTAGES
from rollmill.algos.gae import discounted_returns, reinforce_pp_token_advantages, value_loss
from rollmill.algos.normalize import EPS, decoupled_group_scores
from rollmill.checks import check_config
from rollmill.config import AlgorithmConfig, ConfigError, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model, load_model
from rollmill.pipelines.common import BASELINE_INDEX
from rollmill.pipelines.rlvr import scored_batch
from rollmill.rewards import score_completion
from rollmill.runtime.learner import streaming_blockers
from rollmill.runtime.queue import SampleQueue
from rollmill.tasks import Example
from rollmill.train import build_batch
from rollmill.train.advantage_computer import AdvantageComputer
from rollmill.train.critic import CriticTrainer
from rollmill.types import GroupSpec, Row, Trajectory, Turn


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol)


R = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0]])
LENGTHS = torch.tensor([[4, 2, 2, 8], [1, 1, 1, 5]])
# b = (4*1 + 8*1) / 16 = 0.75 and (1 + 1 + 1) / 8 = 0.375
OPO = [[0.25, -0.75, -0.75, 0.25], [0.625, 0.625, 0.625, -0.375]]
GREEDY = torch.tensor([1.0, 0.0])
REMAX = [[0.0, -1.0, -1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]


def lengths_mask(lengths: torch.Tensor, width: int = 8) -> torch.Tensor:
    return (torch.arange(width) < lengths.flatten()[:, None]).float()


# -- OPO ----------------------------------------------------------------------------------------------
def test_opo_worked_example():
    assert close(ADVANTAGES["opo"](R, lengths=LENGTHS), OPO)


def test_opo_with_equal_or_no_lengths_is_the_group_mean_baseline():
    dr_grpo = [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]
    assert close(ADVANTAGES["opo"](R), dr_grpo)
    assert close(ADVANTAGES["opo"](R, lengths=torch.full((2, 4), 7)), dr_grpo)


def test_opo_group_of_one_and_zero_lengths():
    assert close(ADVANTAGES["opo"](torch.tensor([[0.3], [1.0]]), lengths=torch.tensor([[3], [5]])), [[0.0], [0.0]])
    assert close(ADVANTAGES["opo"](torch.tensor([[1.0, 0.0]]), lengths=torch.tensor([[0, 0]])), [[0.5, -0.5]])
    with pytest.raises(ValueError, match="lengths must match"):
        ADVANTAGES["opo"](R, lengths=torch.ones(2, 3))


def test_advantage_computer_takes_opo_lengths_from_the_mask_unless_given():
    opo = AdvantageComputer(AlgorithmConfig(advantage="opo"))
    assert close(opo(R, lengths_mask(LENGTHS)), sum(OPO, []))
    # loss weights zero mask rows; the pipeline passes the sampled lengths, which then win
    weighted = lengths_mask(LENGTHS) * torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1])[:, None]
    assert close(opo(R, weighted, lengths=LENGTHS), sum(OPO, []))


# -- ReMax --------------------------------------------------------------------------------------------
def test_remax_worked_example():
    assert close(ADVANTAGES["remax"](R, baseline=GREEDY), REMAX)
    assert close(AdvantageComputer(AlgorithmConfig(advantage="remax"))(R, torch.ones(8, 2), baseline=GREEDY),
                 sum(REMAX, []))
    with pytest.raises(ValueError, match="baseline must be"):
        ADVANTAGES["remax"](R, baseline=torch.zeros(3))
    with pytest.raises(TypeError, match="baseline"):
        AdvantageComputer(AlgorithmConfig(advantage="remax"))(R, torch.ones(8, 2))


def traj(group: int, index: int, reward: float, tokens: int = 2, **info) -> Trajectory:
    row = Row.sampled([5, 6], [7] * tokens, [-0.5] * tokens, version=0)
    turn = Turn("r", "r", "", reward, None, None, False, 0, "stop")
    return Trajectory(group, index, 0, [row], [turn], end_reason="stop", info=dict(info))


def test_queue_waits_for_the_baseline_sample_and_hands_its_reward_to_the_group(tiny_cfg):
    cfg = tiny_cfg(algorithm={"advantage": "remax"}, filters={"overlong_cache": 2},
                   rollout={"sampling": {"max_new_tokens": 4}})
    queue = SampleQueue(cfg, drop_failed_groups=False)
    spec = GroupSpec(0, 0, None, (0, 1, 2, 3, BASELINE_INDEX))
    queue.launched([spec], 0)
    for i, r in enumerate([1.0, 0.0, 0.0, 1.0]):
        assert queue.add(traj(0, i, r)) is None  # all four samples, but not yet the greedy one
    assert queue.add(traj(0, BASELINE_INDEX, 1.0, tokens=3)) == 0
    group = queue.ready[0]
    assert [t.index for t in group] == [0, 1, 2, 3]
    # overlong shaping (L_max 4, cache 2) reaches the greedy sample too: 3 tokens -> (2 - 3) / 2 = -0.5
    assert [t.info["baseline_reward"] for t in group] == [0.5] * 4
    assert queue._again(spec).indices == (0, 1, 2, 3, BASELINE_INDEX)


def test_a_failed_greedy_sample_leaves_its_group_the_mean_of_its_own_rewards(tiny_cfg):
    from rollmill.pipelines.rlvr import greedy_baselines

    queue = SampleQueue(tiny_cfg(algorithm={"advantage": "remax"}), drop_failed_groups=False)
    queue.launched([GroupSpec(g, g, None, (0, 1, 2, 3, BASELINE_INDEX)) for g in (0, 1)], 0)
    for g in (0, 1):
        for i, r in enumerate([1.0, 0.0, 0.0, 1.0] if g == 0 else [1.0, 1.0, 1.0, 0.0]):
            queue.add(traj(g, i, r))
    failed = traj(0, BASELINE_INDEX, 0.0)
    failed.failed = True  # its reward function raised: scored 0, for no fault of the reply
    queue.add(failed)
    queue.add(traj(1, BASELINE_INDEX, 0.0))  # a greedy reply that was simply wrong
    assert queue.counts["remax/failed_baselines"] == 1
    assert greedy_baselines([queue.ready[0], queue.ready[1]]).tolist() == [0.5, 0.0]


def test_dynamic_sampling_keeps_a_remax_group_whose_samples_agree_but_differ_from_the_greedy_reply(tiny_cfg):
    queue = SampleQueue(tiny_cfg(algorithm={"advantage": "remax"}, filters={"dynamic_sampling": True}),
                        drop_failed_groups=False)
    queue.launched([GroupSpec(g, g, None, (0, 1, 2, 3, BASELINE_INDEX)) for g in (0, 1)], 0)
    for g, greedy in ((0, 0.0), (1, 1.0)):  # every sample right; the greedy reply wrong (0), or right too (1)
        for i in range(4):
            queue.add(traj(g, i, 1.0))
        queue.add(traj(g, BASELINE_INDEX, greedy))
    assert list(queue.ready) == [0]  # advantages 1 - 0 = 1 train; 1 - 1 = 0 everywhere do not
    assert queue.counts["filter/dropped_groups"] == 1


def test_remax_greedy_sample_is_generated_scored_and_not_trained(tiny_cfg, make_job, tmp_path):
    cfg = tiny_cfg(algorithm={"advantage": "remax", "track_kl": False}, eval={"before": False})
    job = make_job(cfg, tmp_path / "run")
    arrived, taken, trained = [], [], []
    add, take, step = job.queue.add, job.queue.take, job.roles.learner.trainer.step
    job.queue.add = lambda t: (arrived.append(t), add(t))[1]
    job.queue.take = lambda *a, **k: (taken.append(take(*a, **k)), taken[-1])[1]
    job.roles.learner.trainer.step = lambda batch, **k: (trained.append(batch), step(batch, **k))[1]
    record, _ = job.train_step()

    greedy = [t for t in arrived if t.index == BASELINE_INDEX]
    assert len(greedy) == cfg.rollout.prompts_per_step
    model, tokenizer = load_model(cfg.model)
    for g in greedy:  # the engine's greedy reply: argmax decoding of the initial weights
        ids = list(g.rows[0].prompt_ids)
        with torch.no_grad():
            for _ in range(cfg.rollout.sampling.max_new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
        assert g.rows[0].token_ids == ids[len(g.rows[0].prompt_ids):]
    examples = {e.id: e for e in job.source.train}
    groups = taken[0].groups
    for g in groups:
        assert [t.index for t in g] == list(range(cfg.rollout.group_size))
        (mine,) = [t for t in greedy if t.group_id == g[0].group_id]
        example = examples[job.source.train[g[0].prompt_id].id]
        assert mine.reward == score_completion(mine.turns[0].reply, example, cfg.reward).total
        assert all(t.info["baseline_reward"] == mine.reward for t in g)
    (batch,) = trained
    assert batch.size == cfg.rollout.prompts_per_step * cfg.rollout.group_size  # the greedy replies stay out
    expected = [t.reward - t.info["baseline_reward"] for g in groups for t in g]
    assert close(batch.advantages, expected)
    assert record["reward/greedy_baseline"] == pytest.approx(sum(t.reward for t in greedy) / len(greedy))


def test_opo_and_remax_stream_per_group(tiny_cfg):
    for name in ("opo", "remax"):
        assert streaming_blockers(tiny_cfg(algorithm={"advantage": name})) == []


# -- per-reward-function normalization (GDPO) -----------------------------------------------------------
F1 = [[1.0, 0, 0, 1], [1, 1, 1, 0]]
F2 = [[2.0, 0, 0, 0], [1, 1, 1, 1]]
# weights 1 and 0.5. Group A: z1 = +-0.5/0.577351 = +-0.866024, z2 = [1.5, -0.5, -0.5, -0.5]/(1 + 1e-6);
# group B: z1 = [0.25, 0.25, 0.25, -0.75]/0.500001, z2 = 0 (constant)
DECOUPLED = [[1.616023, -1.116024, -1.116024, 0.616024], [0.499999, 0.499999, 0.499999, -1.499997]]


def test_decoupled_group_scores_worked_example():
    assert close(decoupled_group_scores(torch.tensor([F1, F2]), [1.0, 0.5]), DECOUPLED)
    with pytest.raises(ValueError, match="functions=1"):
        decoupled_group_scores(torch.tensor([F1, F2]), [1.0])


def test_scores_carry_each_function_and_the_batch_uses_the_decoupled_sum(tiny_cfg):
    fns = [{"name": "format", "kwargs": {"pattern": ".*[0-9].*"}}, {"name": "first_integer", "weight": 0.5}]
    cfg = tiny_cfg(reward={"functions": fns, "normalize_each": True})
    score = score_completion("7 apples", Example("x", "2+5?", "7"), cfg.reward)
    assert score.terms == {"format": 1.0, "first_integer": 1.0} and score.total == 1.5
    groups = [[traj(g, i, F1[g][i] + 0.5 * F2[g][i], reward_terms={"format": F1[g][i], "first_integer": F2[g][i]})
               for i in range(4)] for g in range(2)]
    scored = scored_batch(SimpleNamespace(cfg=cfg, pad_id=0), groups)
    assert close(scored.scores, DECOUPLED)
    plain = scored_batch(SimpleNamespace(cfg=tiny_cfg(reward={"functions": fns}), pad_id=0), groups)
    assert close(plain.scores, [[2.0, 0, 0, 1], [1.5, 1.5, 1.5, 0.5]])


def test_normalize_each_trains_a_step(tiny_cfg, make_job, tmp_path):
    cfg = tiny_cfg(reward={"normalize_each": True}, algorithm={"advantage": "batch", "track_kl": False},
                   eval={"before": False})
    record, _ = make_job(cfg, tmp_path / "run").train_step()
    assert torch.isfinite(torch.tensor(record["loss"]))


# -- the std epsilon --------------------------------------------------------------------------------------
def test_std_eps_defaults_to_eps_and_reaches_every_std():
    assert AlgorithmConfig().std_eps == EPS == 1e-6
    pair = torch.tensor([[1.0, 0.0]])
    # std of [1, 0] = 0.707107: 0.5 / (0.707107 + 1e-4) = 0.707007 (TRL's eps)
    for algo in ({"advantage": "grpo"}, {"advantage": "normalized"}, {"advantage": "batch"},
                 {"advantage": "dr_grpo", "whiten_advantages": True}):
        adv = AdvantageComputer(AlgorithmConfig(std_eps=1e-4, **algo))(pair, torch.ones(2, 1))
        assert close(adv.flatten(), [0.707007, -0.707007]), algo


# -- REINFORCE++ token form --------------------------------------------------------------------------------
MASK = torch.tensor([[1.0, 1, 1], [1, 1, 0]])


def test_reinforce_pp_token_worked_example():
    # gamma 0.5: returns [0.25, 0.5, 1] and [0, 0]; mean 0.35, unbiased std 0.418330 over the 5 tokens
    outcome = torch.tensor([1.0, 0.0])
    assert close(discounted_returns(torch.tensor([[0, 0, 1.0], [0, 0, 0]]), MASK, 0.5), [[0.25, 0.5, 1], [0, 0, 0]])
    adv = reinforce_pp_token_advantages(outcome, MASK, gamma=0.5)
    assert close(adv, [[-0.239045, 0.358568, 1.553793], [-0.836658, -0.836658, 0.0]])


def test_reinforce_pp_token_with_kl_penalty_per_token():
    # beta 0.1: rewards [-0.02, -0.01, 0.97] and [-0.05, -0.04]; gamma 0.5 returns [0.2175, 0.475, 0.97]
    # and [-0.07, -0.04]: mean 0.3105, unbiased std 0.429616
    kl = torch.tensor([[0.2, 0.1, 0.3], [0.5, 0.4, 9.9]])
    adv = reinforce_pp_token_advantages(torch.tensor([1.0, 0.0]), MASK, 0.5, kl=kl, beta=0.1)
    expected = [[-0.216472, 0.382899, 1.535088], [-0.885672, -0.815843, 0.0]]
    assert close(adv, expected)
    computer = AdvantageComputer(AlgorithmConfig(advantage="reinforce_pp_token", gamma=0.5))
    assert close(computer(torch.tensor([[1.0, 0.0]]), MASK, token_kl=kl, beta=0.1), expected)


def test_reinforce_pp_token_trains_with_reward_side_kl(tiny_cfg, make_job, tmp_path):
    cfg = tiny_cfg(algorithm={"advantage": "reinforce_pp_token", "gamma": 0.9, "kl_coef": 0.05,
                              "kl_placement": "reward"}, eval={"before": False})
    record, _ = make_job(cfg, tmp_path / "run").train_step()
    assert torch.isfinite(torch.tensor(record["loss"])) and "kl/reward_side" in record


# -- value-loss aggregation ---------------------------------------------------------------------------------
def test_value_loss_aggregation_modes_worked_example():
    # sequence A (the §2.1 example): max-clipped token losses [0.070623, 0.148225, 0.01], sum 0.228848;
    # sequence B: V 0.2 (old 0, clip 0.2), G 1 -> 0.64
    values = torch.tensor([[0.9, 0.6, 0.9], [0.2, 0.0, 0.0]])
    old = torch.tensor([[0.5, 0.6, 0.7], [0.0, 0.0, 0.0]])
    returns = torch.tensor([[0.96575, 0.985, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    expected = {"seq-mean-token-mean": 0.179071, "token-mean": 0.108606, "seq-mean-token-sum": 0.217212,
                "seq-mean-token-sum-norm": 0.144808}
    for mode, loss in expected.items():
        assert close(value_loss(values, old, returns, mask, 0.2, mode), loss), mode


def test_critic_token_mean_loss_is_independent_of_micro_batching():
    tok = build_char_tokenizer()
    g = torch.Generator().manual_seed(0)
    rows = [Row.sampled(torch.randint(3, len(tok), (4,), generator=g).tolist(),
                        torch.randint(3, len(tok), (n,), generator=g).tolist(), [-1.0] * n) for n in (3, 5, 2, 4)]
    grads = []
    for micro in (4, 1):
        algo = AlgorithmConfig(name="ppo", critic_lr=1e-2, value_loss_agg="token-mean")
        critic = CriticTrainer(build_tiny_model(len(tok), seed=0), TrainConfig(micro_batch_size=micro), algo)
        batch = build_batch(rows, torch.zeros(4), pad_id=2)
        _, returns, old = critic.advantages(batch, torch.tensor([1.0, 0.0, 1.0, 0.5]))
        critic.step(batch, old, returns)
        grads.append(torch.cat([p.grad.flatten() for p in critic.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -- config ---------------------------------------------------------------------------------------------------
def test_new_names_pass_the_config_checks(tiny_cfg):
    for name in ("opo", "remax", "reinforce_pp_token"):
        assert name in ADVANTAGE_NAMES
        check_config(tiny_cfg(algorithm={"advantage": name}))
    assert "opo" in GROUP_BASELINE_ADVANTAGES
    check_config(tiny_cfg(algorithm={"name": "ppo", "value_loss_agg": "token-mean"}))


@pytest.mark.parametrize("sections,key", [
    ({"algorithm": {"value_loss_agg": "seq-sum"}}, "algorithm.value_loss_agg = 'seq-sum'"),
    ({"reward": {"normalize_each": True}, "rollout": {"group_size": 1}}, "reward.normalize_each = True"),
    ({"pipeline": "agentic", "algorithm": {"advantage": "remax"}}, "algorithm.advantage = 'remax'"),
    ({"pipeline": "agentic", "algorithm": {"advantage": "reinforce_pp_token"}}, "algorithm.advantage"),
    ({"pipeline": "agentic", "reward": {"normalize_each": True}}, "reward.normalize_each = True"),
])
def test_bad_settings_are_named(tiny_cfg, sections, key):
    pipeline = sections.pop("pipeline", "rlvr")
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_config(tiny_cfg(**sections).model_copy(update={"pipeline": pipeline}))
