"""Dynamic sampling, difficulty mask, overlong filter and shaping inside the RLVR pipeline."""

import torch

from rollmill.pipelines.groups import Groups
from rollmill.pipelines.rlvr import RLVRPipeline
from rollmill.rollout import Completion
from rollmill.tasks import Example


def test_dynamic_sampling_trains_only_on_informative_groups(tiny_cfg, tmp_path):
    cfg = tiny_cfg(filters={"dynamic_sampling": True, "max_refill_rounds": 3}, eval={"before": False})
    pipe = RLVRPipeline(cfg, tmp_path / "run")
    record = pipe.rollout_and_train()
    kept, sampled = record["filter/kept_groups"], record["filter/sampled_groups"]
    assert 1 <= kept <= cfg.rollout.prompts_per_step <= sampled
    assert record["rollout/samples"] == sampled * cfg.rollout.group_size
    assert (kept == cfg.rollout.prompts_per_step) or record["filter/refill_rounds"] == 3


def test_no_informative_group_means_no_update_and_the_run_goes_on(tiny_cfg, tmp_path):
    never = {"functions": [{"name": "exact_match"}]}  # a random model never says the exact answer
    cfg = tiny_cfg(reward=never, filters={"dynamic_sampling": True, "max_refill_rounds": 2}, eval={"before": False})
    pipe = RLVRPipeline(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    record = pipe.rollout_and_train()
    assert record["filter/kept_groups"] == 0 and record["filter/refill_rounds"] == 2
    assert record["filter/sampled_groups"] == 3 * cfg.rollout.prompts_per_step
    assert "loss" not in record
    assert all(torch.equal(before[k], v) for k, v in pipe.model.state_dict().items())
    assert pipe.step == 1


def test_overlong_shaping_adds_the_dapo_penalty_to_each_reward(tiny_cfg, tmp_path):
    from rollmill.pipelines.groups import sample_groups
    from rollmill.rewards import compute_rewards

    cfg = tiny_cfg(filters={"overlong_cache": 2}, rollout={"sampling": {"max_new_tokens": 4}}, eval={"before": False})
    pipe = RLVRPipeline(cfg, tmp_path / "run")
    examples = pipe.cursor.take(2)
    groups = sample_groups(pipe.engine, pipe.tokenizer, examples, cfg, first_group=0)
    repeated = [examples[c.prompt_index] for c in groups.completions]
    base = compute_rewards([c.text for c in groups.completions], repeated, cfg.reward).total
    lengths = [len(c.token_ids) for c in groups.completions]
    expected = [b + (0.0 if n <= 2 else (2 - n) / 2) for b, n in zip(base, lengths)]
    assert groups.rewards == expected
    assert 4 in lengths  # the penalty was exercised


def completion(n_tokens, reason):
    return Completion(0, [1], [5] * n_tokens, [-1.0] * n_tokens, "", reason, 0)


def test_loss_weights_combine_difficulty_mask_and_overlong_filter(tiny_cfg):
    ex = Example("a", "q", "1")
    comps = [completion(2, "stop"), completion(4, "length"), completion(2, "stop"), completion(2, "stop")]
    groups = Groups([ex, ex], comps, [1.0, 0.0, 1.0, 1.0], [True, False, True, True], [False] * 4, [], group_size=2)
    cfg = tiny_cfg(filters={"difficulty_low": 0.0, "difficulty_high": 1.0, "overlong_filter": True})
    # group 0 (mean 0.5) is kept but its second sample hit the length cap; group 1 (mean 1.0) is solved
    assert groups.loss_weights(cfg).tolist() == [1.0, 0.0, 0.0, 0.0]
