"""Calling env code that may raise or hang: each call in its own daemon thread, with a deadline.

A hung env cannot be killed from Python; its thread is abandoned (daemon, so it never blocks
exit) and the episode is marked failed. Calls for all live episodes run at once, so slow envs
(tools, sandboxes) overlap instead of adding up.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class CallResult:
    value: Any = None
    error: str | None = None  # "ExcType: message" when the call raised
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def call_all(calls: list[tuple[Callable, tuple]], timeout_s: float) -> list[CallResult]:
    """Run every `fn(*args)` concurrently; each gets `timeout_s` from the moment all have started."""
    results = [CallResult() for _ in calls]

    def run(slot: CallResult, fn: Callable, args: tuple) -> None:
        try:
            slot.value = fn(*args)
        except Exception as err:  # an env bug fails its episode, never the run
            slot.error = f"{type(err).__name__}: {' '.join(str(err).split())}"

    threads = [threading.Thread(target=run, args=(slot, fn, args), daemon=True) for slot, (fn, args) in zip(results, calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for slot, t in zip(results, threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            slot.timed_out = True
    return results
