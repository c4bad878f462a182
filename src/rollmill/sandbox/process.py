"""A development backend with NO isolation: commands run as host processes in a temp directory.

Use it only where bubblewrap cannot run (a laptop without it). It keeps the interface and the
typed statuses, kills the command's process group on timeout and caps output, but a command can
read and write anything the host user can, reach the network, and detach from its group.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

from rollmill.sandbox.capture import run_capped
from rollmill.sandbox.spec import ExecResult, SandboxError, SandboxSpec, SandboxStats, Status

log = logging.getLogger(__name__)
WARNING = "ProcessBackend gives NO isolation (development only): commands run as host processes"


class ProcessBackend:
    """`spec.workdir` maps to a host temp dir holding a copy of `spec.workspace`; absolute paths
    inside commands are host paths. Memory is capped with RLIMIT_AS; pids, cpu and network are not."""

    name = "process"

    def __init__(self, root: str | Path | None = None):
        log.warning(WARNING)
        self.root = Path(root or tempfile.mkdtemp(prefix="rollmill-process-sandboxes-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # a temp root of our own goes with the backend even when nobody calls close()
        self._remove_root = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True) \
            if root is None else None
        self._specs: dict[str, tuple[SandboxSpec, float]] = {}
        self._execs: dict[str, int] = {}
        self._lock = threading.Lock()

    def create(self, spec: SandboxSpec, sandbox_id: str | None = None) -> str:
        sandbox_id = sandbox_id or f"sb-{uuid.uuid4().hex[:12]}"
        with self._lock:
            if sandbox_id in self._specs:
                return sandbox_id
            self._specs[sandbox_id] = (spec, time.monotonic())
            self._execs[sandbox_id] = 0
        self._populate(sandbox_id, spec)
        return sandbox_id

    def _populate(self, sandbox_id: str, spec: SandboxSpec) -> None:
        work = self._dir(sandbox_id)
        if spec.workspace:
            shutil.copytree(spec.workspace, work, symlinks=True)
        else:
            work.mkdir(parents=True)

    def exec(self, sandbox_id, argv=None, *, script=None, timeout_s=None, cwd=None, env=None,
             stdin=None, max_output_bytes=None) -> ExecResult:
        if (argv is None) == (script is None):
            raise SandboxError("exec needs exactly one of argv or script")
        spec = self._spec(sandbox_id)
        work = self._dir(sandbox_id)
        command = list(argv) if argv is not None else ["/bin/bash", "-c", script]
        variables = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), **spec.env, **(env or {})}
        memory = spec.memory_bytes
        command = ["prlimit", f"--as={memory}", "--", *command]
        with self._lock:
            self._execs[sandbox_id] += 1
        run = run_capped(command, timeout_s=spec.exec_timeout_s if timeout_s is None else timeout_s,
                         max_output_bytes=max_output_bytes or spec.max_output_bytes, stdin=stdin,
                         env=variables, cwd=str(work / (cwd or ".").lstrip("/")) if cwd else str(work),
                         kill=_kill_group, start_new_session=True)
        return ExecResult(
            status=Status.TIMEOUT if run.timed_out else Status.OK, exit_code=run.exit_code,
            stdout=run.stdout.decode(errors="replace"), stderr=run.stderr.decode(errors="replace"),
            duration_s=run.duration_s, truncated=run.truncated, output_bytes=run.output_bytes,
            limit="exec_timeout" if run.timed_out else None,
        )

    def put(self, sandbox_id: str, path: str, data: bytes) -> None:
        target = self._path(sandbox_id, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def get(self, sandbox_id: str, path: str) -> bytes:
        target = self._path(sandbox_id, path)
        if not target.is_file():
            raise SandboxError(f"get {path}: no such file")
        return target.read_bytes()

    def reset(self, sandbox_id: str) -> None:
        spec = self._spec(sandbox_id)
        shutil.rmtree(self._dir(sandbox_id), ignore_errors=True)
        self._populate(sandbox_id, spec)

    def stats(self, sandbox_id: str) -> SandboxStats:
        _, created = self._specs.get(sandbox_id) or (None, 0.0)
        self._spec(sandbox_id)
        return SandboxStats(execs=self._execs[sandbox_id], age_s=time.monotonic() - created)

    def destroy(self, sandbox_id: str) -> None:
        with self._lock:
            self._specs.pop(sandbox_id, None)
            self._execs.pop(sandbox_id, None)
        shutil.rmtree(self._dir(sandbox_id), ignore_errors=True)

    def list(self) -> list[str]:
        with self._lock:
            return sorted(self._specs)

    def sweep(self) -> int:
        return 0

    def close(self) -> None:
        for sid in self.list():
            self.destroy(sid)
        if self._remove_root is not None:
            self._remove_root()

    def _spec(self, sandbox_id: str) -> SandboxSpec:
        with self._lock:
            entry = self._specs.get(sandbox_id)
        if entry is None:
            raise SandboxError(f"unknown sandbox {sandbox_id!r}")
        return entry[0]

    def _dir(self, sandbox_id: str) -> Path:
        if not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
            raise SandboxError(f"bad sandbox id {sandbox_id!r}")
        return self.root / sandbox_id

    def _path(self, sandbox_id: str, path: str) -> Path:
        """Paths under the workdir, relative or absolute, map into the sandbox's directory."""
        spec = self._spec(sandbox_id)
        relative = path[len(spec.workdir) + 1:] if path.startswith(spec.workdir + "/") else path
        base = self._dir(sandbox_id).resolve()
        target = (base / relative).resolve()
        if os.path.isabs(relative) or not target.is_relative_to(base):
            raise SandboxError(f"{path}: the process backend only maps paths under {spec.workdir}")
        return target


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
