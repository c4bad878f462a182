"""An env with a slow tail: any registered env whose calls first wait a lognormal time.

Real tool and sandbox calls take from milliseconds to many seconds; this wrapper gives any env that
shape (a median and a log-space spread), so schedulers can be compared on it (`benchmarks/async.py`).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from rollmill.envs.base import make_env, register_env


@register_env("latency", "any registered env whose reset/step first sleep a lognormal time (tool latency)")
class LatencyEnv:
    """`env` built with `env_kwargs`; each step (and each reset when `on_reset`) sleeps exp(N(ln median_s, sigma²)).

    sigma 1.0 puts one call in a hundred above ten times the median: a heavy tail.
    """

    def __init__(self, env: str, env_kwargs: dict[str, Any] | None = None, median_s: float = 0.5, sigma: float = 1.0,
                 on_reset: bool = False, max_s: float = 30.0):
        if median_s < 0 or sigma < 0:
            raise ValueError(f"latency env needs median_s >= 0 and sigma >= 0, got {median_s} and {sigma}")
        self.inner = make_env(env, **(env_kwargs or {}))
        self.instructions = self.inner.instructions
        self.median_s, self.sigma, self.on_reset, self.max_s = median_s, sigma, on_reset, max_s
        self._rng = random.Random()

    def _wait(self) -> None:
        if self.median_s > 0:
            time.sleep(min(self.max_s, math.exp(self._rng.gauss(math.log(self.median_s), self.sigma))))

    def reset(self, seed: int | None = None):
        if self.on_reset:
            self._wait()
        return self.inner.reset(seed)

    def step(self, action: str):
        self._wait()
        return self.inner.step(action)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()
