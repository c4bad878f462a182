"""KL to the reference as a reward penalty, and the adaptive coefficient (docs/algorithms.md §1.1-1.2).

With `kl_placement: reward` the penalty is applied before advantages: scalar estimators get
R - beta * sum_t k_t per sequence (the token penalties summed, as a return with gamma 1 would);
GAE gets the per-token penalties in its token rewards. The sampled tokens' log-probs under the
policy are the engine's behaviour log-probs (same weights, checked by `logprob_mismatch`), so the
penalty costs one reference forward and no policy forward.
"""

from __future__ import annotations

import torch

from rollmill.algos import aggregate_loss, kl_estimate
from rollmill.algos.kl import AdaptiveKLController
from rollmill.config import AlgorithmConfig
from rollmill.train.batch import TrainBatch


class KLControl:
    """Owns beta (fixed or adaptive) and computes the reward-side penalty of a batch."""

    def __init__(self, algo: AlgorithmConfig):
        self.algo = algo
        self.controller = AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)

    @property
    def beta(self) -> float:
        return self.controller.value

    def token_kl(self, batch: TrainBatch, ref_logp: torch.Tensor) -> torch.Tensor:
        """Per-token KL estimate [B, C] of the sampling policy against the reference, 0 off the mask."""
        return kl_estimate(self.algo.kl_estimator, batch.behaviour_logprobs, ref_logp, batch.mask, self.algo.kl_clamp)

    def penalized_scores(self, scores: torch.Tensor, token_kl: torch.Tensor) -> torch.Tensor:
        """R - beta * sum_t k_t, for scores [P, G] and token_kl [P*G, C]."""
        return scores - self.beta * token_kl.sum(-1).view_as(scores)

    def update(self, token_kl: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Adapt beta to this batch's KL (mean over sequences of the per-sequence mean)."""
        current = float(aggregate_loss(token_kl, mask, "seq-mean-token-mean"))
        self.controller.update(current, n_steps=mask.shape[0])
        return {"kl/reward_side": current, "kl/coef": self.beta}
