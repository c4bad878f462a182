"""What the runtime benchmarks (async.py, long_tail.py) share: counting the samples a job trains on,
timing its updates, and one-line logs without the library's per-step chatter."""

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


def time_updates(job) -> list[dict]:
    """Wrap the local learner's update so each one is recorded as {samples, tokens, seconds, lengths,
    prompt_tokens} (the learner's own time, apart from the rollout it may overlap with; the reply
    lengths and the prompt length of each group it trained); return the growing list."""
    import time

    updates, learner = [], job.roles.learner
    train = learner.train

    def timed(groups):
        t0 = time.perf_counter()
        out = train(groups)
        trajs = [t for g in groups for t in g]
        updates.append({"samples": len(trajs), "tokens": sum(t.sampled_tokens for t in trajs),
                        "seconds": time.perf_counter() - t0, "lengths": [[t.sampled_tokens for t in g] for g in groups],
                        "prompt_tokens": [len(g[0].rows[0].prompt_ids) for g in groups]})
        return out

    learner.train = timed
    return updates


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("rollmill", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
