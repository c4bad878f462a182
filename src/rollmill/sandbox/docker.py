"""A backend over a Docker (or Podman) daemon, for machines that have one. Never privileged.

Each sandbox is one long-lived container (`sleep infinity`) with no network, no capabilities,
no-new-privileges, a read-only root, size-capped tmpfs scratch dirs and the spec's cgroup limits;
the workspace is a host copy bound at `workdir` (reset = a fresh copy). A timed-out exec restarts
the container, which kills every process in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

from rollmill.sandbox.backend import PUT_SCRIPT
from rollmill.sandbox.capture import run_capped
from rollmill.sandbox.spec import ExecResult, SandboxError, SandboxSpec, SandboxStats, Status

LABEL = "rollmill.sandbox"


def daemon_available(cli: str = "docker") -> bool:
    """True when `cli info` reaches a daemon within a few seconds."""
    if shutil.which(cli) is None:
        return False
    try:
        return subprocess.run([cli, "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def run_argv(cli: str, name: str, spec: SandboxSpec, workspace: Path, image: str) -> list[str]:
    """The `docker run` command line for one sandbox container."""
    argv = [cli, "run", "-d", "--name", name, "--label", f"{LABEL}={os.getpid()}",
            "--network", "host" if spec.network == "host" else "none",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--read-only",
            "--memory", str(spec.memory_bytes), "--memory-swap", str(spec.memory_bytes),
            "--cpus", str(spec.cpus), "--pids-limit", str(spec.pids), "--user", f"{spec.uid}:{spec.uid}",
            "-v", f"{workspace}:{spec.workdir}", "-w", spec.workdir]
    for d in spec.scratch_dirs:
        argv += ["--tmpfs", f"{d}:size={spec.disk_bytes}"]
    for m in spec.mounts:
        argv += ["-v", f"{m.source}:{m.target}{'' if m.writable else ':ro'}"]
    for key, value in spec.env.items():
        argv += ["-e", f"{key}={value}"]
    return argv + [image, "sleep", "infinity"]


class DockerBackend:
    """Containers from `image` (which must provide the tools tasks need, e.g. bash and python3)."""

    def __init__(self, image: str = "debian:bookworm-slim", cli: str = "docker", root: str | Path | None = None):
        if not daemon_available(cli):
            raise SandboxError(f"no {cli} daemon is reachable", Status.INFRA_ERROR)
        self.name, self.cli, self.image = cli, cli, image
        self.root = Path(root or tempfile.mkdtemp(prefix="rollmill-docker-"))
        self._specs: dict[str, SandboxSpec] = {}
        self._lock = threading.Lock()

    def _docker(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        done = subprocess.run([self.cli, *args], capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise SandboxError(f"{self.cli} {args[0]}: {done.stderr.decode(errors='replace').strip()}",
                               Status.INFRA_ERROR)
        return done

    def create(self, spec: SandboxSpec, sandbox_id: str | None = None) -> str:
        sandbox_id = sandbox_id or f"sb-{uuid.uuid4().hex[:12]}"
        with self._lock:
            if sandbox_id in self._specs:
                return sandbox_id
            self._specs[sandbox_id] = spec
        try:
            self._copy_workspace(sandbox_id, spec)
            subprocess.run(run_argv(self.cli, f"rollmill-{sandbox_id}", spec, self.root / sandbox_id, self.image),
                           capture_output=True, timeout=120, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            self.destroy(sandbox_id)
            raise SandboxError(f"sandbox {sandbox_id}: create failed: {e}", Status.INFRA_ERROR) from e
        return sandbox_id

    def _copy_workspace(self, sandbox_id: str, spec: SandboxSpec) -> None:
        target = self.root / sandbox_id
        shutil.rmtree(target, ignore_errors=True)
        if spec.workspace:
            shutil.copytree(spec.workspace, target, symlinks=True)
        else:
            target.mkdir(parents=True)

    def exec(self, sandbox_id, argv=None, *, script=None, timeout_s=None, cwd=None, env=None,
             stdin=None, max_output_bytes=None) -> ExecResult:
        if (argv is None) == (script is None):
            raise SandboxError("exec needs exactly one of argv or script")
        spec = self._spec(sandbox_id)
        command = [self.cli, "exec", "-i", "-w", cwd or spec.workdir]
        for key, value in (env or {}).items():
            command += ["-e", f"{key}={value}"]
        command += [f"rollmill-{sandbox_id}", *(argv if argv is not None else ["bash", "-c", script])]
        run = run_capped(command, timeout_s=spec.exec_timeout_s if timeout_s is None else timeout_s,
                         max_output_bytes=max_output_bytes or spec.max_output_bytes, stdin=stdin)
        if run.timed_out:  # the client's death does not stop the command: restart the container
            self._docker("restart", "-t", "0", f"rollmill-{sandbox_id}")
        status = Status.TIMEOUT if run.timed_out else Status.OOM if run.exit_code == 137 else Status.OK
        return ExecResult(status, run.exit_code, run.stdout.decode(errors="replace"),
                          run.stderr.decode(errors="replace"), run.duration_s, run.truncated, run.output_bytes,
                          "exec_timeout" if run.timed_out else None)

    def put(self, sandbox_id: str, path: str, data: bytes) -> None:
        result = self.exec(sandbox_id, ["sh", "-c", PUT_SCRIPT, "put", path],
                           stdin=data)
        if not result.ok:
            raise SandboxError(f"put {path}: {result.stderr.strip() or result.status.value}")

    def get(self, sandbox_id: str, path: str) -> bytes:
        limit = self._spec(sandbox_id).max_file_bytes
        result = run_capped([self.cli, "exec", f"rollmill-{sandbox_id}", "cat", "--", path], timeout_s=60,
                            max_output_bytes=2 * limit + 2)
        if result.exit_code != 0:
            raise SandboxError(f"get {path}: no such file or unreadable")
        if len(result.stdout) > limit:
            raise SandboxError(f"get {path}: file is over max_file_bytes={limit}")
        return result.stdout

    def reset(self, sandbox_id: str) -> None:
        spec = self._spec(sandbox_id)
        self._docker("restart", "-t", "0", f"rollmill-{sandbox_id}")
        self._copy_workspace(sandbox_id, spec)

    def stats(self, sandbox_id: str) -> SandboxStats:
        self._spec(sandbox_id)
        return SandboxStats()

    def destroy(self, sandbox_id: str) -> None:
        with self._lock:
            self._specs.pop(sandbox_id, None)
        subprocess.run([self.cli, "rm", "-f", f"rollmill-{sandbox_id}"], capture_output=True, timeout=120)
        shutil.rmtree(self.root / sandbox_id, ignore_errors=True)

    def list(self) -> list[str]:
        with self._lock:
            return sorted(self._specs)

    def sweep(self) -> int:
        """Remove rollmill containers whose creating process is gone."""
        listing = self._docker("ps", "-a", "--filter", f"label={LABEL}", "--format",
                               f'{{{{.Names}}}} {{{{.Label "{LABEL}"}}}}').stdout.decode().split("\n")
        removed = 0
        for line in filter(None, listing):
            name, _, pid = line.partition(" ")
            if not Path(f"/proc/{pid}").exists():
                subprocess.run([self.cli, "rm", "-f", name], capture_output=True, timeout=120)
                removed += 1
        return removed

    def close(self) -> None:
        for sid in self.list():
            self.destroy(sid)
        shutil.rmtree(self.root, ignore_errors=True)

    def _spec(self, sandbox_id: str) -> SandboxSpec:
        with self._lock:
            spec = self._specs.get(sandbox_id)
        if spec is None:
            raise SandboxError(f"unknown sandbox {sandbox_id!r}")
        return spec


__all__ = ["DockerBackend", "daemon_available", "run_argv"]
