"""Run one host process with a wall-clock limit, keeping only the head and tail of its output.

Readers drain the pipes as the process writes, so 100 MB of output costs a bounded buffer, and the
process never blocks on a full pipe.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

CHUNK = 65536
TRUNCATION_MARK = b"\n[... output truncated ...]\n"


class HeadTail:
    """Keeps the first `limit // 2` and last `limit // 2` bytes written to it."""

    def __init__(self, limit: int):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(data)
        self.tail_size += len(data)
        while self.tail and self.tail_size - len(self.tail[0]) >= self.tail_limit:
            self.tail_size -= len(self.tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self.head_limit + self.tail_limit

    def value(self) -> bytes:
        tail = b"".join(self.tail)
        if not self.truncated:
            return bytes(self.head) + tail
        return bytes(self.head) + TRUNCATION_MARK + tail[len(tail) - self.tail_limit:]


@dataclass
class RawRun:
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    output_bytes: int
    duration_s: float


def run_capped(
    argv: list[str],
    *,
    timeout_s: float,
    max_output_bytes: int,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    kill: Callable[[subprocess.Popen], None] | None = None,
    start_new_session: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> RawRun:
    """Run `argv` to its end or until `timeout_s`; then `kill(proc)` (default: SIGKILL it)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
        start_new_session=start_new_session, pass_fds=pass_fds,
    )
    out, err = HeadTail(max_output_bytes), HeadTail(max_output_bytes)
    threads = [threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True)]
    if stdin is not None:
        threads.append(threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True))
    for t in threads:
        t.start()
    timed_out = not _wait(proc, timeout_s)
    if timed_out:
        (kill or _sigkill)(proc)
    proc.wait()
    for t in threads:
        t.join(timeout=2.0)  # a process that escaped the kill may still hold a pipe: don't hang on it
    return RawRun(
        exit_code=proc.returncode, stdout=out.value(), stderr=err.value(), timed_out=timed_out,
        truncated=out.truncated or err.truncated, output_bytes=out.total + err.total,
        duration_s=time.monotonic() - start,
    )


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether `proc` exits within `timeout_s`. A pidfd wakes us the moment it exits: Popen.wait
    with a timeout polls at doubling intervals, which rounded a 9 ms exec up to 16 ms."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # already reaped, or a kernel without pidfds
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        watch = select.poll()
        watch.register(pidfd, select.POLLIN)
        return bool(watch.poll(max(0, int(timeout_s * 1000))))
    finally:
        os.close(pidfd)


def _sigkill(proc: subprocess.Popen) -> None:
    proc.kill()


def _drain(pipe, sink: HeadTail) -> None:
    with pipe:
        while chunk := pipe.read1(CHUNK):
            sink.write(chunk)


def _feed(pipe, data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (BrokenPipeError, OSError):  # the command did not read all of its stdin
        pass
