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
    prompt_tokens} (the learner's own time, apart from the rollout it may overlap with; a streamed
    update's parts added up; the reply lengths and the prompt length of each group it trained);
    return the growing list."""
    import time

    updates, learner, part = [], job.roles.learner, {}
    train, add, finish = learner.train, learner.add_groups, learner.finish_stream

    def note(groups, seconds):
        trajs = [t for g in groups for t in g]
        for key, value in (("samples", len(trajs)), ("tokens", sum(t.sampled_tokens for t in trajs)), ("seconds", seconds),
                           ("lengths", [[t.sampled_tokens for t in g] for g in groups]),
                           ("prompt_tokens", [len(g[0].rows[0].prompt_ids) for g in groups])):
            part[key] = part.get(key, 0 if not isinstance(value, list) else []) + value

    def timed(fn, record):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            note(args[0] if args else [], time.perf_counter() - t0)
            if record:
                updates.append(dict(part))
                part.clear()
            return out
        return call

    learner.train, learner.add_groups, learner.finish_stream = timed(train, True), timed(add, False), timed(finish, True)
    return updates


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("rollmill", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
