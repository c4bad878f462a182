"""From a step's scores to the advantages the loss sees, as the algorithm section composes them.

A registered estimator (grpo, rloo, ...) or the composable "normalized" one (reward clip, then
mean/std normalization by group, batch or running statistics), followed by optional whitening over
valid tokens and an advantage clip. The running statistics are state: checkpoints save them.
"""

from __future__ import annotations

import torch

from rollmill.algos import ADVANTAGES
from rollmill.algos.normalize import RunningMoments, advantage_clip, normalize_rewards, reward_clip, whiten
from rollmill.config import AlgorithmConfig


class AdvantageComputer:
    def __init__(self, algo: AlgorithmConfig):
        self.algo = algo
        self.running = RunningMoments()

    def __call__(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Advantages for scores [P, G]: [P*G] per sequence, or [P*G, C] once whitened over `mask`."""
        a = self.algo
        if a.advantage == "normalized":
            adv = normalize_rewards(reward_clip(scores, a.reward_clip), a.norm_mean, a.norm_std, running=self.running)
        else:
            adv = ADVANTAGES[a.advantage](scores)
        adv = adv.flatten()
        if a.whiten_advantages:
            adv = whiten(adv[:, None] * mask, mask)
        return advantage_clip(adv, a.advantage_clip)

    def state_dict(self) -> dict:
        return self.running.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.running.load_state_dict(state)
