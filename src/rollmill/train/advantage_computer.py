"""From a step's scores to the advantages the loss sees, as the algorithm section composes them.

A registered estimator (grpo, rloo, opo, remax, ...), the composable "normalized" one (reward clip,
then mean/std normalization by group, batch or running statistics) or a token-level one
(reinforce_pp_token), followed by optional whitening over valid tokens and an advantage clip. Every
std division uses `algorithm.std_eps`. The running statistics are state: checkpoints save them.
"""

from __future__ import annotations

import inspect

import torch

from rollmill.algos import ADVANTAGES, TOKEN_ADVANTAGES
from rollmill.algos.normalize import RunningMoments, advantage_clip, normalize_rewards, reward_clip, whiten
from rollmill.config import AlgorithmConfig


class AdvantageComputer:
    def __init__(self, algo: AlgorithmConfig):
        self.algo = algo
        self.running = RunningMoments()

    def __call__(
        self,
        scores: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor | None = None,
        baseline: torch.Tensor | None = None,
        token_kl: torch.Tensor | None = None,
        beta: float = 0.0,
    ) -> torch.Tensor:
        """Advantages for scores [P, G]: [P*G] per sequence, or [P*G, C] per token (token estimators,
        or whitened over `mask` [P*G, C]).

        `lengths` [P, G]: response token counts (OPO; default: the mask's row sums). `baseline` [P]: each
        group's greedy reward (ReMax). `token_kl` [P*G, C] with `beta`: the reward-side KL, which only
        token estimators take per token (the caller folds it into `scores` for the others)."""
        a = self.algo
        if a.advantage in TOKEN_ADVANTAGES:
            adv = TOKEN_ADVANTAGES[a.advantage](scores.flatten(), mask, a.gamma, token_kl, beta, a.std_eps)
        else:
            adv = self._per_sequence(scores, mask, lengths, baseline).flatten()
        if a.whiten_advantages:
            adv = whiten(adv[:, None] * mask if adv.dim() == 1 else adv, mask, a.std_eps)
        return advantage_clip(adv, a.advantage_clip)

    def _per_sequence(self, scores, mask, lengths, baseline) -> torch.Tensor:
        a = self.algo
        if a.advantage == "normalized":
            return normalize_rewards(reward_clip(scores, a.reward_clip), a.norm_mean, a.norm_std, a.std_eps,
                                     running=self.running)
        if lengths is None:
            lengths = mask.sum(-1).view_as(scores)
        given = {"eps": a.std_eps, "lengths": lengths, "baseline": baseline}
        return estimate(a.advantage, scores, **{k: v for k, v in given.items() if v is not None})

    def state_dict(self) -> dict:
        return self.running.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.running.load_state_dict(state)


def estimate(name: str, scores: torch.Tensor, **inputs: torch.Tensor | float) -> torch.Tensor:
    """`ADVANTAGES[name](scores, ...)` given those of `inputs` the estimator declares (eps, lengths,
    baseline); an input it requires but `inputs` lacks raises TypeError naming it."""
    fn = ADVANTAGES[name]
    params = inspect.signature(fn).parameters
    return fn(scores, **{k: v for k, v in inputs.items() if k in params})
