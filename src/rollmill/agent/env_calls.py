"""Calling env code that may raise or hang: each call in its own daemon thread, awaited with a deadline.

A hung env cannot be killed from Python; its thread is abandoned (daemon, so it never blocks exit)
and the episode is marked failed. Each episode awaits only its own calls, so slow envs (tools,
sandboxes) never hold up the others.
"""

from __future__ import annotations

import asyncio
import threading
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


async def call_env(fn: Callable, args: tuple, timeout_s: float) -> CallResult:
    """`fn(*args)` in a daemon thread; a raise or a call slower than `timeout_s` becomes the result."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(result: CallResult) -> None:
        if not future.done():
            future.set_result(result)

    def run() -> None:
        try:
            result = CallResult(value=fn(*args))
        except Exception as err:  # an env bug fails its episode, never the run
            result = CallResult(error=f"{type(err).__name__}: {' '.join(str(err).split())}")
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:  # the loop closed while this call hung: nobody waits for it any more
            pass

    threading.Thread(target=run, daemon=True, name=f"env-{getattr(fn, '__name__', 'call')}").start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except asyncio.TimeoutError:
        return CallResult(timed_out=True)
