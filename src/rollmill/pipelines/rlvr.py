"""RLVR: prompts -> G samples each -> verifiable rewards -> advantages -> policy update.

Each piece runs in one role: `PromptSource` on the driver, `PromptEpisodes` on the rollout worker (one
sample = one completion, scored by the reward workers as soon as it ends), `update` on the learner.
This file composes tasks, rewards, algos and the trainer; it holds no math of its own.
"""

from __future__ import annotations

import random
from collections import OrderedDict, defaultdict
from typing import NamedTuple

import torch

from rollmill.algos import GREEDY_BASELINE_ADVANTAGES, TOKEN_ADVANTAGES
from rollmill.algos.filters import difficulty_mask
from rollmill.algos.normalize import decoupled_group_scores
from rollmill.config import RunConfig
from rollmill.pipelines.base import EpisodeContext, RLPipeline
from rollmill.pipelines.common import (BASELINE_INDEX, PromptCursor, encode_prompt, sample_seed, sampling_params,
                                       step_seed)
from rollmill.pipelines.evaluate import pass_at_k
from rollmill.rewards import reward_keys
from rollmill.rollout.engine import Request
from rollmill.tasks import Example, load_task
from rollmill.train import TrainBatch, build_batch
from rollmill.train.anchor_credit import anchor_scaled_advantages
from rollmill.types import GroupSpec, Row, Trajectory, Turn


class PromptSource:
    """Training prompts in a seeded order (epoch after epoch) and the held-out split; numbers groups.

    With `task.mix`, each group first draws its source by the sources' weights (seeded by the group's
    id, so resume and Ray draw the same), then takes that source's next prompt from its own cursor.
    Estimators with a greedy baseline (ReMax) get one more sample per group, `BASELINE_INDEX`.
    """

    def __init__(self, cfg: RunConfig):
        self.train, self.eval = load_task(cfg.task)
        seed = cfg.task.seed + cfg.train.seed
        self.seed = seed
        labels = [item.mix_label for item in cfg.task.mix] or [None]
        self.weights = [item.weight for item in cfg.task.mix] or [1.0]
        self.members = [[i for i, e in enumerate(self.train) if e.meta.get("source") == label] if label else
                        list(range(len(self.train))) for label in labels]
        self.cursors = [PromptCursor(len(m), seed=seed + k) for k, m in enumerate(self.members)]
        self.groups_started = 0
        self.baseline = (BASELINE_INDEX,) if cfg.algorithm.advantage in GREEDY_BASELINE_ADVANTAGES else ()

    def next_groups(self, count: int, samples: int) -> list[GroupSpec]:
        specs = []
        for k in range(count):
            gid = self.groups_started + k
            source = self._source(gid)
            i = self.members[source][self.cursors[source].take(1)[0]]
            specs.append(GroupSpec(gid, i, self.train[i], tuple(range(samples)) + self.baseline))
        self.groups_started += count
        return specs

    def _source(self, group_id: int) -> int:
        if len(self.cursors) == 1:
            return 0
        return random.Random(f"{self.seed}/mix/{group_id}").choices(range(len(self.weights)), self.weights)[0]

    def eval_groups(self, samples: int) -> list[GroupSpec]:
        return [GroupSpec(i, i, ex, tuple(range(samples)), eval=True) for i, ex in enumerate(self.eval)]

    def state(self) -> dict:
        states = [c.state() for c in self.cursors]
        return {"cursor": states[0] if len(states) == 1 else states, "groups_started": self.groups_started}

    def load_state(self, state: dict) -> None:
        saved = state["cursor"] if isinstance(state["cursor"], list) else [state["cursor"]]
        self.cursors = [PromptCursor(c.size, c.seed, **s) for c, s in zip(self.cursors, saved)]
        self.groups_started = state["groups_started"]


class PromptEpisodes:
    """One sample: the chat-formatted prompt, one completion, its score (and each reward function's
    value, for `reward.normalize_each`). The group's baseline sample is the greedy completion."""

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.sampling = sampling_params(cfg.rollout.sampling, n=1)
        self.greedy = sampling_params(cfg.rollout.sampling, n=1, temperature=0.0)
        self.eval_sampling = sampling_params(cfg.rollout.sampling, n=1, temperature=cfg.eval.temperature,
                                             max_new_tokens=cfg.eval.max_new_tokens)
        self.eval_seed = step_seed(cfg.train.seed, -1)  # the same draws at every eval, so evals compare
        self._prompts: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # the G samples of a group share one

    def _encode(self, example: Example) -> tuple[int, ...]:
        if example.id not in self._prompts:
            self._prompts[example.id] = tuple(encode_prompt(self.tokenizer, example, self.cfg.task))
            if len(self._prompts) > 4096:
                self._prompts.popitem(last=False)
        return self._prompts[example.id]

    async def run(self, spec: GroupSpec, index: int, ctx: EpisodeContext) -> Trajectory:
        example: Example = spec.payload
        base, sampling = (self.eval_seed, self.eval_sampling) if spec.eval else (self.cfg.train.seed, self.sampling)
        if index == BASELINE_INDEX:
            sampling = self.greedy
        prompt = self._encode(example)
        completion = await ctx.generate(Request(prompt, sampling, sample_seed(base, spec.group_id, index)))
        score = await ctx.score(completion.text, example)
        row = Row(list(prompt))
        row.append_sampled(completion.token_ids, completion.logprobs, completion.versions, turn=0)
        turn = Turn(completion.text, completion.text, "", score.total, None, None, False, 0, completion.finish_reason)
        return Trajectory(spec.group_id, index, spec.prompt_id, [row], [turn], initial_observation=example.prompt,
                          success=score.correct, failed=score.failed, error=score.error,
                          end_reason=completion.finish_reason,
                          info={"answer": example.answer, "columns": example.meta, "reward_terms": score.terms})

    def close(self) -> None:
        """Nothing to release."""


class RLVRPipeline(RLPipeline):
    """Prompts from a task, G samples each, verifiable rewards."""

    name = "rlvr"

    def source(self, cfg: RunConfig) -> PromptSource:
        return PromptSource(cfg)

    def episodes(self, cfg: RunConfig, tokenizer) -> PromptEpisodes:
        return PromptEpisodes(cfg, tokenizer)

    def update(self, learner, groups: list[list[Trajectory]]) -> dict[str, float]:
        """Advantages (scalar or token estimator, or GAE over the critic's values), KL shaping, the update."""
        cfg, algo = learner.cfg, learner.cfg.algorithm
        batch, scores, lengths, baseline = scored_batch(learner, groups)
        ref_logp = token_kl = None
        if algo.kl_placement == "reward" and algo.kl_coef > 0:
            ref_logp = learner.trainer.reference_logprobs(batch)
            token_kl = learner.kl.token_kl(batch, ref_logp)
        if learner.critic is None:
            kl = {}
            if token_kl is not None and algo.advantage in TOKEN_ADVANTAGES:  # the penalty stays on its tokens
                kl = {"token_kl": token_kl, "beta": learner.kl.beta}
            elif token_kl is not None:
                scores = learner.kl.penalized_scores(scores, token_kl)
            batch.advantages = learner.advantages(scores, batch.mask, lengths, baseline, **kl)
            if algo.anchor_credit != "none":
                batch.advantages = anchor_scaled_advantages(learner.model, batch, algo, cfg.train.micro_batch_size)
            metrics = learner.trainer.step(batch, ref_logp=ref_logp)
        else:
            beta = learner.kl.beta if token_kl is not None else 0.0
            batch.advantages, returns, old_values = learner.critic.advantages(batch, scores.flatten(), token_kl, beta)
            metrics = {**learner.trainer.step(batch, ref_logp=ref_logp),
                       **learner.critic.step(batch, old_values, returns)}
        learner.after_update(metrics, token_kl, batch)
        return metrics

    def add_groups(self, learner, groups: list[list[Trajectory]]) -> None:
        """The streamed form of `update` (`Learner.add_groups`): these groups' advantages, then their
        forward/backward. Only for configs `streaming_blockers` passes: per-group advantages, no critic,
        no reward-side KL, no attention credit."""
        batch, scores, lengths, baseline = scored_batch(learner, groups)
        batch.advantages = learner.advantages(scores, batch.mask, lengths, baseline)
        learner.trainer.add(batch)

    def rollout_metrics(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        """What the policy did this step, over every sampled group (filtered ones included)."""
        trajs = [t for g in groups for t in g]
        scores = torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32)
        lengths = [len(t.rows[0].token_ids) for t in trajs]
        greedy = [g[0].info["baseline_reward"] for g in groups
                  if "baseline_reward" in g[0].info and not g[0].info.get("baseline_failed")]
        return {
            "rollout/samples": len(trajs),
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "reward/failed": float(sum(t.failed for t in trajs)),
            "accuracy/train": sum(t.success for t in trajs) / len(trajs),
            "groups/zero_std_fraction": float((scores.std(dim=1) == 0).float().mean()) if scores.shape[1] > 1 else 1.0,
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/clipped_fraction": sum(t.end_reason == "length" for t in trajs) / len(trajs),
            **per_source(trajs, "rollout/samples", "reward/mean", "accuracy/train"),
            **({"reward/greedy_baseline": sum(greedy) / len(greedy)} if greedy else {}),
        }

    def sample_dump(self, traj: Trajectory, tokenizer) -> dict:
        """Prompt, answer, completion, reward, and the example's other columns (when it has any)."""
        dump = {"prompt": traj.initial_observation, "answer": traj.info["answer"], "completion": traj.turns[0].reply,
                "reward": traj.reward, "correct": traj.success, "finish_reason": traj.end_reason}
        columns = traj.info.get("columns")
        return {**dump, "columns": columns} if columns else dump

    def eval_metrics(self, groups: list[list[Trajectory]]) -> dict[str, float]:
        """eval/accuracy (= pass@1, mean correctness over all samples), eval/pass@k for k = 2, 4, ... up
        to n, eval/reward (mean total reward), eval/failed (reward errors)."""
        trajs = [t for g in groups for t in g]
        n = len(groups[0])
        metrics = {
            "eval/accuracy": sum(t.success for t in trajs) / len(trajs),
            "eval/reward": sum(t.reward for t in trajs) / len(trajs),
            "eval/failed": float(sum(t.failed for t in trajs)),
            **per_source(trajs, None, "eval/reward", "eval/accuracy"),
        }
        k = 2
        while k <= n:
            metrics[f"eval/pass@{k}"] = sum(pass_at_k(n, sum(t.success for t in g), k) for g in groups) / len(groups)
            k *= 2
        return metrics


def per_source(trajs: list[Trajectory], count: str | None, reward: str, accuracy: str) -> dict[str, float]:
    """`<name>/<source>` metrics of a `task.mix` run (nothing for one source): how many samples each
    source had, their mean reward and accuracy."""
    groups = defaultdict(list)
    for t in trajs:
        label = (t.info.get("columns") or {}).get("source")
        if label is not None:
            groups[label].append(t)
    out = {}
    for label, ts in sorted(groups.items()):
        if count:
            out[f"{count}/{label}"] = len(ts)
        out[f"{reward}/{label}"] = sum(t.reward for t in ts) / len(ts)
        out[f"{accuracy}/{label}"] = sum(t.success for t in ts) / len(ts)
    return out


class Scored(NamedTuple):
    """What the advantages of a step's groups are computed from."""

    batch: TrainBatch  # the samples, their loss weights applied to the mask
    scores: torch.Tensor  # [P, G] rewards; with reward.normalize_each, the decoupled scores
    lengths: torch.Tensor  # [P, G] tokens each response sampled, before loss weights (OPO)
    baseline: torch.Tensor | None  # [P] each group's greedy reward (ReMax), else None


def scored_batch(learner, groups: list[list[Trajectory]]) -> Scored:
    """The groups' samples as a batch, and the scores, lengths and baselines of their advantages."""
    cfg = learner.cfg
    trajs = [t for g in groups for t in g]
    scores = torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32)
    batch = build_batch([t.rows[0] for t in trajs], torch.zeros(len(trajs)), learner.pad_id)
    lengths = batch.mask.sum(-1).view_as(scores)
    batch.mask *= loss_weights(trajs, scores, cfg)[:, None]
    if cfg.reward.normalize_each:
        scores = decoupled_scores(groups, cfg)
    baseline = greedy_baselines(groups) if cfg.algorithm.advantage in GREEDY_BASELINE_ADVANTAGES else None
    return Scored(batch, scores, lengths, baseline)


def decoupled_scores(groups: list[list[Trajectory]], cfg: RunConfig) -> torch.Tensor:
    """`reward.normalize_each` (docs/algorithms.md §C.4): each reward function's values normalized
    within each group, then weighted and summed (`normalize.decoupled_group_scores`); a failed sample
    counts 0 for every function, and the overlong penalty added after scoring is added back as it is."""
    keys, weights = reward_keys(cfg.reward), [f.weight for f in cfg.reward.functions]
    terms = torch.tensor([[[0.0 if t.failed else t.info["reward_terms"][k] for t in g] for g in groups] for k in keys],
                         dtype=torch.float32)
    shaping = torch.tensor([[t.info.get("overlong_penalty", 0.0) for t in g] for g in groups], dtype=torch.float32)
    return decoupled_group_scores(terms, weights, cfg.algorithm.std_eps) + shaping


def greedy_baselines(groups: list[list[Trajectory]]) -> torch.Tensor:
    """[P]: each group's greedy reward (ReMax, §C.3), which the sample queue put on its samples. A greedy
    sample that failed (its reward function raised or timed out) scored 0 for a reason that says nothing of
    the prompt: that group's baseline is the mean reward of its own samples instead."""
    missing = [g[0].group_id for g in groups if "baseline_reward" not in g[0].info]
    if missing:
        raise ValueError(f"groups {missing} have no greedy baseline sample (info 'baseline_reward'), which "
                         f"algorithm.advantage {GREEDY_BASELINE_ADVANTAGES} needs")
    return torch.tensor([sum(t.reward for t in g) / len(g) if g[0].info.get("baseline_failed")
                         else g[0].info["baseline_reward"] for g in groups], dtype=torch.float32)


def loss_weights(trajs: list[Trajectory], scores: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Per-sample 0/1 weights [N]: the difficulty mask and the overlong filter (docs/algorithms.md §2.13-2.14).

    Each weight depends on its sample's group alone, so a streamed update's chunks get the weights the
    whole batch would give them."""
    weights = torch.ones(len(trajs))
    f = cfg.filters
    if f.difficulty_low is not None or f.difficulty_high is not None:
        low = f.difficulty_low if f.difficulty_low is not None else float("-inf")
        high = f.difficulty_high if f.difficulty_high is not None else float("inf")
        weights *= difficulty_mask(scores, low, high).flatten()
    if f.overlong_filter:
        weights *= torch.tensor([t.end_reason != "length" for t in trajs], dtype=torch.float32)
    return weights
