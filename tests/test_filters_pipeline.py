"""Dynamic sampling, difficulty mask, overlong filter and shaping inside the RLVR pipeline."""

import torch

from rollmill.pipelines.rlvr import loss_weights
from rollmill.runtime.queue import SampleQueue
from rollmill.types import GroupSpec, Row, Trajectory, Turn


def test_dynamic_sampling_trains_only_on_informative_groups(tiny_cfg, tmp_path, make_job):
    cfg = tiny_cfg(filters={"dynamic_sampling": True, "max_refill_rounds": 3}, eval={"before": False})
    record, _ = make_job(cfg, tmp_path / "run").train_step()
    kept, sampled = record["filter/kept_groups"], record["filter/sampled_groups"]
    assert 1 <= kept <= cfg.rollout.prompts_per_step <= sampled
    assert record["rollout/samples"] == sampled * cfg.rollout.group_size
    assert (kept == cfg.rollout.prompts_per_step) or record["filter/refill_rounds"] == 3


def test_no_informative_group_means_no_update_and_the_run_goes_on(tiny_cfg, tmp_path, make_job):
    never = {"functions": [{"name": "exact_match"}]}  # a random model never says the exact answer
    cfg = tiny_cfg(reward=never, filters={"dynamic_sampling": True, "max_refill_rounds": 2}, eval={"before": False})
    job = make_job(cfg, tmp_path / "run")
    model = job.roles.learner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record, _ = job.train_step()
    assert record["filter/kept_groups"] == 0 and record["filter/refill_rounds"] == 2
    assert record["filter/sampled_groups"] == 3 * cfg.rollout.prompts_per_step
    assert "loss" not in record
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert job.step == 1 and job.roles.workers[0].version == 1


def sample(group, index, n_tokens, reason, reward=1.0, failed=False):
    row = Row.sampled([1], [5] * n_tokens, [-1.0] * n_tokens)
    turn = Turn("", "", "", reward, None, None, False, 0, reason)
    return Trajectory(group, index, group, [row], [turn], failed=failed, end_reason=reason)


def test_overlong_shaping_adds_the_dapo_penalty_to_each_reward(tiny_cfg):
    cfg = tiny_cfg(filters={"overlong_cache": 2}, rollout={"group_size": 4, "sampling": {"max_new_tokens": 4}})
    queue = SampleQueue(cfg, drop_failed_groups=False)
    queue.launched([GroupSpec(0, 0, None, (0, 1, 2, 3))], version=0)
    lengths = [1, 2, 3, 4]
    done = [queue.add(sample(0, i, n, "length" if n == 4 else "stop")) for i, n in enumerate(lengths)]
    assert done == [None, None, None, 0]
    (group,) = queue.take(0, force=True).groups
    # no penalty up to max_len - cache = 2 tokens, then a ramp to -1 at max_len
    assert [t.reward for t in group] == [1.0, 1.0, 0.5, 0.0]


def test_loss_weights_combine_difficulty_mask_and_overlong_filter(tiny_cfg):
    trajs = [sample(0, 0, 2, "stop", 1.0), sample(0, 1, 4, "length", 0.0), sample(1, 0, 2, "stop"), sample(1, 1, 2, "stop")]
    scores = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cfg = tiny_cfg(filters={"difficulty_low": 0.0, "difficulty_high": 1.0, "overlong_filter": True})
    # group 0 (mean 0.5) is kept but its second sample hit the length cap; group 1 (mean 1.0) is solved
    assert loss_weights(trajs, scores, cfg).tolist() == [1.0, 0.0, 0.0, 0.0]
