"""A pool over any backend: a cap on live sandboxes, warm ones ready to lease, leases with a TTL,
and a reaper that destroys what its holder forgot."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.spec import ExecResult, SandboxError, SandboxSpec, Status

log = logging.getLogger(__name__)


def default_max_sandboxes() -> int:
    """Sandboxes mostly wait on the model, so several per core fit; 4 per core is a safe start."""
    return 4 * (os.cpu_count() or 1)


@dataclass
class Lease:
    """One sandbox held by one user until `release()` or its deadline (monotonic seconds)."""

    pool: "SandboxPool"
    id: str
    deadline: float
    spec: SandboxSpec

    def exec(self, argv: list[str] | None = None, **kwargs) -> ExecResult:
        return self.pool.backend.exec(self._live(), argv, **kwargs)

    def put(self, path: str, data: bytes) -> None:
        self.pool.backend.put(self._live(), path, data)

    def get(self, path: str) -> bytes:
        return self.pool.backend.get(self._live(), path)

    def reset(self) -> None:
        self.pool.backend.reset(self._live())

    def release(self) -> None:
        self.pool.release(self)

    def _live(self) -> str:
        if not self.pool.holds(self):
            raise SandboxError(f"lease on sandbox {self.id} has expired or was released")
        return self.id

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SandboxPool:
    """Lease sandboxes from `backend`: at most `max_sandboxes` live at once (leased + warm).

    `warm` sandboxes of `warm_spec` are created ahead of time, so leasing that spec skips create;
    a lease of it is reset and handed out again on release instead of destroyed.
    """

    def __init__(self, backend: SandboxBackend, max_sandboxes: int | None = None, warm: int = 0,
                 warm_spec: SandboxSpec | None = None, reap_interval_s: float = 1.0):
        self.backend = backend
        self.max_sandboxes = max_sandboxes or default_max_sandboxes()
        if warm > self.max_sandboxes:
            raise ValueError(f"warm={warm} is more than max_sandboxes={self.max_sandboxes}")
        self.warm_spec = warm_spec if warm_spec is not None else SandboxSpec()
        self.warm_target = warm
        self._cond = threading.Condition()
        self._leases: dict[str, Lease] = {}
        self._warm: list[str] = []
        self._closed = False
        self.reaped = 0
        for _ in range(warm):
            self._warm.append(backend.create(self.warm_spec))
        self._reaper = threading.Thread(target=self._reap_loop, args=(reap_interval_s,), daemon=True)
        self._reaper.start()

    def lease(self, spec: SandboxSpec | None = None, ttl_s: float | None = None,
              wait_s: float = 60.0) -> Lease:
        """A sandbox for `spec` (the warm spec when None); waits up to `wait_s` for room."""
        spec = spec or self.warm_spec
        ttl = spec.ttl_s if ttl_s is None else ttl_s
        with self._cond:
            if spec == self.warm_spec and self._warm:
                sid = self._warm.pop()
            else:
                if not self._cond.wait_for(self._has_room, timeout=wait_s):
                    raise SandboxError(f"sandbox pool full ({self.max_sandboxes} live) for {wait_s:.0f} s",
                                       Status.INFRA_ERROR)
                if self._closed:
                    raise SandboxError("sandbox pool is closed", Status.INFRA_ERROR)
                sid = None
            lease = Lease(self, sid or "", time.monotonic() + ttl, spec)
            if sid is not None:
                self._leases[sid] = lease
                return lease
            self._leases[f"pending-{id(lease)}"] = lease  # holds a slot while create runs unlocked
        try:
            lease.id = self.backend.create(spec)
        finally:
            with self._cond:
                self._leases.pop(f"pending-{id(lease)}")
                if lease.id:
                    self._leases[lease.id] = lease
                self._cond.notify_all()
        return lease

    def release(self, lease: Lease) -> None:
        """Give a sandbox back: warm ones are reset and kept, others destroyed. Idempotent."""
        with self._cond:
            if self._leases.get(lease.id) is not lease:
                return
            del self._leases[lease.id]
            keep = lease.spec == self.warm_spec and len(self._warm) < self.warm_target and not self._closed
        if keep and self._reset_ok(lease.id):
            with self._cond:
                self._warm.append(lease.id)
                self._cond.notify_all()
            return
        self.backend.destroy(lease.id)
        with self._cond:
            self._cond.notify_all()

    def holds(self, lease: Lease) -> bool:
        with self._cond:
            return self._leases.get(lease.id) is lease

    def live(self) -> int:
        with self._cond:
            return len(self._leases) + len(self._warm)

    def close(self) -> None:
        """Destroy every sandbox of the pool, leased or warm."""
        with self._cond:
            self._closed = True
            ids = [sid for sid in self._leases if not sid.startswith("pending-")] + self._warm
            self._leases.clear()
            self._warm.clear()
            self._cond.notify_all()
        for sid in ids:
            self.backend.destroy(sid)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _has_room(self) -> bool:
        return self._closed or len(self._leases) + len(self._warm) < self.max_sandboxes

    def _reset_ok(self, sandbox_id: str) -> bool:
        try:
            self.backend.reset(sandbox_id)
            return True
        except SandboxError as e:
            log.warning("sandbox %s: reset failed, destroying it: %s", sandbox_id, e)
            return False

    def _reap_loop(self, interval_s: float) -> None:
        while not self._closed:
            time.sleep(interval_s)
            now = time.monotonic()
            with self._cond:
                expired = [lease for sid, lease in self._leases.items()
                           if not sid.startswith("pending-") and lease.deadline < now]
            for lease in expired:
                log.warning("sandbox %s: lease expired after its TTL, destroying it", lease.id)
                with self._cond:
                    if self._leases.get(lease.id) is lease:
                        del self._leases[lease.id]
                        self.reaped += 1
                self.backend.destroy(lease.id)
                with self._cond:
                    self._cond.notify_all()
