"""What the runtime benchmarks (async.py, long_tail.py) share: counting the samples a job trains on,
and one-line logs without the library's per-step chatter."""

from __future__ import annotations

import logging
from typing import Callable


def count_trained(job) -> Callable[[], int]:
    """Wrap `job`'s learner call so every trained sample is counted; return the count's getter."""
    trained, train = 0, job.roles.train

    def counting(groups, step):
        nonlocal trained
        trained += sum(len(g) for g in groups)
        return train(groups, step)

    job.roles.train = counting
    return lambda: trained


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("rollmill", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
