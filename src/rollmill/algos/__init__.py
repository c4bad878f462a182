"""Pure tensor math for RL post-training: advantages, policy losses, KL estimators, aggregation.

Nothing here knows about models, engines, files or Ray. Each registry maps the name users write in
configs to a function; the catalog grows by adding entries, not by touching the training loop.
"""

from rollmill.algos.advantages import ADVANTAGES, group_normalized_advantages
from rollmill.algos.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from rollmill.algos.distill import ddk_update, token_kl, topk_forward_kl
from rollmill.algos.gae import reinforce_pp_token_advantages
from rollmill.algos.kl import KL_ESTIMATORS, kl_estimate
from rollmill.algos.losses import POLICY_LOSSES, PolicyLossOutput, ppo_clip_loss
from rollmill.algos import clip_alternatives  # noqa: F401  (registers sapo, gpg, gmpo in POLICY_LOSSES)

# Estimators over token values need a critic, so they live outside the scalar ADVANTAGES registry.
CRITIC_ADVANTAGES = ("gae",)
# Critic-free estimators over token rewards: (outcome [B], mask [B, L], gamma, kl, beta, eps) -> [B, L].
TOKEN_ADVANTAGES = {"reinforce_pp_token": reinforce_pp_token_advantages}
# "normalized" composes algorithm.norm_mean / norm_std / reward_clip / advantage_clip / whitening.
ADVANTAGE_NAMES = (*ADVANTAGES, "normalized", *TOKEN_ADVANTAGES, *CRITIC_ADVANTAGES)
# Estimators whose baseline is the group's own mean: with one sample per group every advantage is 0.
GROUP_BASELINE_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "lite_ppo", "opo")
# Estimators whose baseline is the reward of one extra greedy sample per group, scored but never trained.
GREEDY_BASELINE_ADVANTAGES = ("remax",)

__all__ = [
    "ADVANTAGES",
    "ADVANTAGE_NAMES",
    "CRITIC_ADVANTAGES",
    "GREEDY_BASELINE_ADVANTAGES",
    "GROUP_BASELINE_ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "TOKEN_ADVANTAGES",
    "PolicyLossOutput",
    "aggregate_loss",
    "ddk_update",
    "group_normalized_advantages",
    "kl_estimate",
    "ppo_clip_loss",
    "token_kl",
    "topk_forward_kl",
]
