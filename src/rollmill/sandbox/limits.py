"""Ceilings a sandbox server's operator sets, and the host's own, checked before any work is done.

The client never chooses its ceilings: `Limits` comes from `rollmill sandbox serve --max-...`. A
request over a ceiling is refused with a 400 naming the field and the ceiling; nothing is ever
clamped, so a client runs exactly what it asked for or learns why not. A spec is also checked
against what the host can give at all (RAM, pid_max, cpus, the smallest cpu quota), so an
impossible spec is the client's error (400), not a failed cgroup write (503).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.datastructures import Headers

from rollmill.sandbox.spec import MiB, SandboxSpec

# cgroup v1 refuses a cfs quota under 1 ms per 100 ms period
MIN_CPUS = 0.01
# spec field -> (Limits attribute, the `rollmill sandbox serve` flag that sets it)
SPEC_CEILINGS = {
    "exec_timeout_s": ("max_exec_timeout_s", "--max-exec-timeout"),
    "max_output_bytes": ("max_output_bytes", "--max-output"),
    "max_file_bytes": ("max_file_bytes", "--max-file"),
    "ttl_s": ("max_ttl_s", "--max-ttl"),
    "memory_bytes": ("max_memory_bytes", "--max-memory"),
    "disk_bytes": ("max_disk_bytes", "--max-disk"),
    "pids": ("max_pids", "--max-pids"),
    "cpus": ("max_cpus", "--max-cpus"),
}


class Refused(HTTPException):
    """A request the server turns down on its own policy (`code` is the HTTP status). `extra`
    joins the error body, e.g. the field and the ceiling; `retry_after_s` sets Retry-After."""

    def __init__(self, code: int, message: str, retry_after_s: float | None = None, **extra):
        headers = None if retry_after_s is None else {"Retry-After": str(math.ceil(retry_after_s))}
        super().__init__(code, message, headers=headers)
        self.extra = extra


@dataclass(frozen=True)
class Limits:
    """The operator's ceilings. Memory, disk, pids and cpus are bounded by the host's capacity
    too (`host_capacity`, whichever is lower); None leaves the host's bound alone.

    `max_request_bytes` caps JSON bodies (exec stdin travels inside, base64), `max_file_bytes`
    caps file uploads and downloads (and `spec.max_file_bytes`). `max_sandboxes` and
    `max_concurrent_execs` (commands running in sandboxes: exec, put, get) are answered with 429
    and Retry-After when reached.
    """

    max_request_bytes: int = 16 * MiB
    max_file_bytes: int = 64 * MiB
    max_exec_timeout_s: float = 600.0
    max_output_bytes: int = 16 * MiB
    max_ttl_s: float = 24 * 3600.0
    max_memory_bytes: int | None = None
    max_disk_bytes: int | None = None
    max_pids: int | None = 4096
    max_cpus: float | None = None
    max_sandboxes: int = 256
    max_concurrent_execs: int = 64

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")

    def check_spec(self, spec: SandboxSpec) -> None:
        """Raise Refused (400) when a field of `spec` is over its ceiling or the host's capacity."""
        host = host_capacity()
        for name, (attr, flag) in SPEC_CEILINGS.items():
            ceiling, source = getattr(self, attr), f"this server's ceiling ({flag})"
            if name in host and (ceiling is None or host[name][0] < ceiling):
                ceiling, source = host[name]
            _refuse_over(f"spec.{name}", getattr(spec, name), ceiling, source)
        if spec.cpus < MIN_CPUS:
            raise Refused(400, f"spec.cpus={spec.cpus} is under {MIN_CPUS}, the smallest cpu quota cgroups allow",
                          field="spec.cpus", floor=MIN_CPUS)

    def check_exec(self, timeout_s: float | None, max_output_bytes: int | None) -> None:
        """Raise Refused (400) when an exec asks for more time or output than the ceilings."""
        _refuse_over("timeout_s", timeout_s, self.max_exec_timeout_s, "this server's ceiling (--max-exec-timeout)")
        _refuse_over("max_output_bytes", max_output_bytes, self.max_output_bytes,
                     "this server's ceiling (--max-output)")


def _refuse_over(field: str, value: float | None, ceiling: float | None, source: str) -> None:
    if value is not None and ceiling is not None and value > ceiling:
        raise Refused(400, f"{field}={value} is over {source}: {ceiling}", field=field, ceiling=ceiling)


@functools.cache
def host_capacity() -> dict[str, tuple[float, str]]:
    """spec field -> (the most this host can give one sandbox, what that is). A sandbox's disk is
    a tmpfs, so it lives in RAM like its memory."""
    ram = _meminfo_bytes("MemTotal")
    capacity = {"cpus": (float(os.cpu_count() or 1), "the host's cpu count")}
    if ram is not None:
        capacity["memory_bytes"] = (ram, "the host's RAM")
        capacity["disk_bytes"] = (ram, "the host's RAM (a sandbox's disk is a tmpfs)")
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            capacity["pids"] = (int(f.read()), "the kernel's pid_max")
    except (OSError, ValueError):
        pass
    return capacity


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == key:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class BodyLimit:
    """ASGI middleware: 413 for a request body over its ceiling, before anything parses it.

    A Content-Length over the ceiling is refused unread; a streamed body as soon as it passes the
    ceiling. File uploads get `max_file_bytes`, every other body (JSON, exec stdin included)
    `max_request_bytes`. The refusal is raised where the app reads the body, so the app's own
    exception handlers answer it.
    """

    def __init__(self, app, limits: Limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].endswith("/files"):
            cap, flag = self.limits.max_file_bytes, "--max-file"
        else:
            cap, flag = self.limits.max_request_bytes, "--max-request"
        declared = Headers(scope=scope).get("content-length", "")
        declared_too_large = declared.isdigit() and int(declared) > cap
        too_large = f"the request body is over this server's {cap}-byte limit ({flag})"
        received = 0

        async def capped_receive():
            nonlocal received
            if declared_too_large:  # refused before a byte of the body is read
                raise Refused(413, too_large)
            event = await receive()
            received += len(event.get("body", b""))
            if received > cap:
                raise Refused(413, too_large)
            return event

        await self.app(scope, capped_receive, send)
