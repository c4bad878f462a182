"""What one sandbox server holds: the sandboxes it created (a cap, idle TTLs enforced by a reaper
thread), the commands running in them (a cap), and a shutdown that kills both."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import anyio

from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.limits import Refused
from rollmill.sandbox.spec import SandboxSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
# ids of reaped sandboxes kept to answer "expired" rather than "unknown"; bounded against floods
REMEMBER_EXPIRED = 10_000
RETRY_AFTER_S = 1.0


@dataclass
class _Entry:
    spec: SandboxSpec
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0


class SandboxTracker:
    """The sandboxes created through one server, and the caps on them.

    A sandbox idle for longer than its spec's `ttl_s` is destroyed by a reaper thread. Idle time
    counts from the end of the last operation on it, not from create, and an operation in flight
    keeps it alive: a pool's warm sandbox lives as long as it is used. A later operation on a
    reaped sandbox is a 404 saying it expired. `close` refuses new work (503) and destroys every
    sandbox, which kills the commands still running in them.
    """

    def __init__(self, backend: SandboxBackend, max_sandboxes: int, max_concurrent_execs: int,
                 reap_interval_s: float = 1.0):
        self.backend = backend
        self.max_sandboxes = max_sandboxes
        self.max_concurrent_execs = max_concurrent_execs
        self.reap_interval_s = reap_interval_s
        self._lock = threading.Lock()
        self._live: dict[str, _Entry] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()
        self._creating = 0
        self._running = 0
        self._closing = False
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        # commands get threads of their own, so a full exec cap never starves FastAPI's threadpool
        self._threads = anyio.CapacityLimiter(max_concurrent_execs)

    def start(self) -> None:
        """Start the reaper thread."""
        self._reaper = threading.Thread(target=self._reap_loop, name="rollmill-sandbox-reaper", daemon=True)
        self._reaper.start()

    # -- sandboxes ---------------------------------------------------------------------------
    def create(self, spec: SandboxSpec, sandbox_id: str | None) -> str:
        """`backend.create` within the cap on live sandboxes (blocking); return the id."""
        with self._lock:
            self._check_open()
            # creating a live id again is a no-op that takes no room; a create in flight holds one
            room = 0 if sandbox_id in self._live else 1
            if room and len(self._live) + self._creating >= self.max_sandboxes:
                raise Refused(429, f"this server holds its maximum of {self.max_sandboxes} sandboxes "
                              "(--max-sandboxes); destroy one or retry later", RETRY_AFTER_S)
            self._creating += room
        try:
            sandbox_id = self.backend.create(spec, sandbox_id)
        finally:
            with self._lock:
                self._creating -= room
        with self._lock:
            self._expired.pop(sandbox_id, None)
            self._live.setdefault(sandbox_id, _Entry(spec)).last_used = time.monotonic()
            closing = self._closing
        if closing:  # close() may have run while the create did: it missed this one
            self._destroy(sandbox_id)
            self._check_open()
        return sandbox_id

    def forget(self, sandbox_id: str) -> None:
        """The sandbox was destroyed on request: neither live nor expired any more."""
        with self._lock:
            self._live.pop(sandbox_id, None)
            self._expired.pop(sandbox_id, None)

    def spec(self, sandbox_id: str) -> SandboxSpec | None:
        """The spec a sandbox was created with through this server, else None."""
        with self._lock:
            entry = self._live.get(sandbox_id)
        return None if entry is None else entry.spec

    @contextmanager
    def use(self, sandbox_id: str) -> Iterator[None]:
        """Mark the sandbox busy (never reaped) for the block; 404 when it expired."""
        with self._lock:
            self._check_open()
            if sandbox_id in self._expired:
                raise Refused(404, f"sandbox {sandbox_id!r} expired: it was idle for longer than its ttl_s, "
                              "so the server destroyed it")
            entry = self._live.get(sandbox_id)
            if entry is not None:
                entry.busy += 1
        try:
            yield
        finally:
            if entry is not None:
                with self._lock:
                    entry.busy -= 1
                    entry.last_used = time.monotonic()

    # -- commands ----------------------------------------------------------------------------
    async def run_command(self, sandbox_id: str, call: Callable[[], T]) -> T:
        """Run `call` (a command in the sandbox) in a thread of its own: 429 when
        `max_concurrent_execs` commands already run, 503 when the server shut down meanwhile."""
        with self._lock:
            self._check_open()
            if self._running >= self.max_concurrent_execs:
                raise Refused(429, f"this server already runs its maximum of {self.max_concurrent_execs} "
                              "commands (--max-concurrent-execs); retry later", RETRY_AFTER_S)
            self._running += 1
        try:
            with self.use(sandbox_id):
                result = await anyio.to_thread.run_sync(call, limiter=self._threads)
        finally:
            with self._lock:
                self._running -= 1
        with self._lock:
            self._check_open()  # the command was killed by close(): its result is not its own
        return result

    def load(self) -> dict:
        """Live sandboxes and running commands, with their caps (for /health)."""
        with self._lock:
            return {"sandboxes": len(self._live), "max_sandboxes": self.max_sandboxes,
                    "execs": self._running, "max_concurrent_execs": self.max_concurrent_execs}

    # -- reaping and shutdown ------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Destroy the sandboxes idle for longer than their TTL; return their ids."""
        now = time.monotonic()
        with self._lock:
            stale = [sid for sid, e in self._live.items() if e.busy == 0 and now - e.last_used > e.spec.ttl_s]
            for sid in stale:
                del self._live[sid]
                self._expired[sid] = now
            while len(self._expired) > REMEMBER_EXPIRED:
                self._expired.popitem(last=False)
        for sid in stale:
            log.warning("sandbox %s: idle for longer than its ttl_s, destroying it", sid)
            self._destroy(sid)
        return stale

    def close(self) -> None:
        """Refuse new work, stop the reaper and destroy every sandbox (killing what runs in them).
        Idempotent."""
        with self._lock:
            self._closing = True
            ids = list(self._live)
            self._live.clear()
        self._stop.set()
        if ids:
            # in parallel: shutdown time must not grow with the number of sandboxes
            with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
                list(pool.map(self._destroy, ids))
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(timeout=5.0)

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.reap_interval_s):
            try:
                self.reap()
            except Exception:  # the reaper must outlive one failed destroy
                log.exception("sandbox reaper failed")

    def _destroy(self, sandbox_id: str) -> None:
        try:
            self.backend.destroy(sandbox_id)
        except Exception:
            log.exception("could not destroy sandbox %s", sandbox_id)

    def _check_open(self) -> None:
        if self._closing:
            raise Refused(503, "the sandbox server is shutting down", RETRY_AFTER_S)


def kill_child_processes() -> None:
    """SIGKILL this process's children and their process groups: the commands of a backend whose
    destroy leaves them running (`process`, or bwrap without cgroups). Only for a process that
    owns all of its children, like `rollmill sandbox serve`."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent != me:
            continue
        for kill in (os.killpg, os.kill):  # killpg fails harmlessly unless the child leads a group
            try:
                kill(int(stat.parent.name), signal.SIGKILL)
            except OSError:
                pass
