"""Sampling G completions per prompt, scoring them, and choosing which groups and samples train.

The math of the filters lives in `rollmill.algos.filters`; this module applies it to rollouts:
refilling the batch for dynamic sampling, shaping rewards for overlong replies, and zeroing the
loss of samples that must not train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollmill.algos.filters import difficulty_mask, informative_groups, overlong_penalty
from rollmill.config import RunConfig
from rollmill.pipelines.common import PromptCursor, encode_prompt, sample_seed, sampling_params
from rollmill.rewards import compute_rewards
from rollmill.rollout import Completion
from rollmill.rollout.engine import Request
from rollmill.tasks import Example


@dataclass
class Groups:
    """Rollouts of several prompts, G samples each, group-major; per-sample lists align with completions."""

    examples: list[Example]
    completions: list[Completion]
    rewards: list[float]  # after length shaping
    correct: list[bool]
    failed: list[bool]
    errors: list[str]
    group_size: int

    @property
    def scores(self) -> torch.Tensor:
        return torch.tensor(self.rewards, dtype=torch.float32).view(len(self.examples), self.group_size)

    def select(self, groups: list[int]) -> "Groups":
        rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        return Groups(
            [self.examples[g] for g in groups], [self.completions[i] for i in rows], [self.rewards[i] for i in rows],
            [self.correct[i] for i in rows], [self.failed[i] for i in rows], self.errors, self.group_size,
        )

    def __add__(self, other: "Groups") -> "Groups":
        return Groups(
            self.examples + other.examples, self.completions + other.completions, self.rewards + other.rewards,
            self.correct + other.correct, self.failed + other.failed, self.errors + other.errors, self.group_size,
        )

    def loss_weights(self, cfg: RunConfig) -> torch.Tensor:
        """Per-sample 0/1 weights [N]: the difficulty mask and the overlong filter."""
        weights = torch.ones(len(self.completions))
        f = cfg.filters
        if f.difficulty_low is not None or f.difficulty_high is not None:
            low = f.difficulty_low if f.difficulty_low is not None else float("-inf")
            high = f.difficulty_high if f.difficulty_high is not None else float("inf")
            weights *= difficulty_mask(self.scores, low, high).flatten()
        if f.overlong_filter:
            weights *= torch.tensor([c.finish_reason != "length" for c in self.completions], dtype=torch.float32)
        return weights


def sample_groups(engine, tokenizer, examples: list[Example], cfg: RunConfig, first_group: int) -> Groups:
    """Generate `group_size` completions per example and score them (plus DAPO length shaping); the
    examples are groups `first_group`, `first_group + 1`, ... of the run (their ids seed the samples)."""
    g = cfg.rollout.group_size
    sp = sampling_params(cfg.rollout.sampling, n=1)
    requests = [Request(tuple(encode_prompt(tokenizer, ex, cfg.task)), sp, sample_seed(cfg.train.seed, first_group + i, j))
                for i, ex in enumerate(examples) for j in range(g)]
    completions = engine.run(requests)
    repeated = [examples[k // g] for k in range(len(completions))]
    result = compute_rewards([c.text for c in completions], repeated, cfg.reward)
    rewards = result.total
    if cfg.filters.overlong_cache:
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        shaping = overlong_penalty(lengths, cfg.rollout.sampling.max_new_tokens, cfg.filters.overlong_cache)
        rewards = [r + float(s) for r, s in zip(rewards, shaping)]
    return Groups(examples, completions, rewards, result.correct, result.failed, result.errors, cfg.rollout.group_size)


def collect_groups(engine, tokenizer, cursor: PromptCursor, cfg: RunConfig, first_group: int) -> tuple[Groups, Groups, int]:
    """(all sampled groups, the groups to train on, refill rounds used); the groups sampled are numbered
    from `first_group` on.

    Without dynamic sampling both are the same `prompts_per_step` groups. With it, groups whose
    rewards do not vary are dropped and new prompts are sampled, at most `max_refill_rounds` times;
    the step then trains on the informative groups it has (possibly fewer, possibly none).
    """
    want = cfg.rollout.prompts_per_step
    sampled = sample_groups(engine, tokenizer, cursor.take(want), cfg, first_group)
    if not cfg.filters.dynamic_sampling:
        return sampled, sampled, 0
    kept = sampled.select(_informative(sampled))
    rounds = 0
    while len(kept.examples) < want and rounds < cfg.filters.max_refill_rounds:
        rounds += 1
        extra = sample_groups(engine, tokenizer, cursor.take(want - len(kept.examples)), cfg,
                              first_group + len(sampled.examples))
        sampled = sampled + extra
        kept = kept + extra.select(_informative(extra))
    return sampled, kept, rounds


def _informative(groups: Groups) -> list[int]:
    return [i for i, keep in enumerate(informative_groups(groups.scores).tolist()) if keep]
