"""Reward workers: stateless scorers that take each sample the moment it finishes, several at a time.

`LocalRewards` runs them as threads of the rollout worker's process; the Ray backend runs
`RewardWorker` actors instead and gives the rollout worker a client with the same `score` coroutine.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from rollmill.config import RewardConfig
from rollmill.rewards import Score, score_completion
from rollmill.tasks import Example


class RewardWorker:
    """Scores one completion against its example with the configured reward functions."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    def score(self, completion: str, example: Example) -> Score:
        return score_completion(completion, example, self.cfg)


class LocalRewards:
    """`workers` reward workers as threads; `score` is awaited by the episodes of a rollout worker."""

    def __init__(self, cfg: RewardConfig, workers: int):
        self.worker = RewardWorker(cfg)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reward")

    async def score(self, completion: str, example: Example) -> Score:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.worker.score, completion, example)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
