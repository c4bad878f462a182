"""The default backend: bubblewrap namespaces + cgroup v1 limits + a copy-on-write workspace.

Each `exec` is one `bwrap --unshare-all --die-with-parent --cap-drop ALL` process over the sandbox's
persistent filesystem: killing it kills its whole PID namespace, daemonised grandchildren included,
so no command outlives its exec. Files persist between execs; processes do not. Nothing of ours
runs inside the sandbox.

bwrap itself runs as `host_uid`, an identity that owns nothing on the host (`nobody` by default):
the sandbox's root is that uid outside, so host files only root may read stay unreadable whatever
path leads to them. Every host directory reaches bwrap as a descriptor opened once (`--bind-fd`),
its arguments come through a descriptor (`--args`), and a seccomp filter refuses the syscalls shell
work never needs. docs/sandbox.md has the whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rollmill.sandbox.backend import PUT_SCRIPT
from rollmill.sandbox.capture import RawRun, run_capped
from rollmill.sandbox.cgroup import Cgroup, cgroups_available, leftover_cgroups
from rollmill.sandbox.mounts import SandboxFS, mounts_under, remove_tree
from rollmill.sandbox import seccomp
from rollmill.sandbox.paths import check_passable, close_all, is_dir, memfd, open_held
from rollmill.sandbox.spec import (ExecResult, SandboxError, SandboxSpec, SandboxStats, Status)

log = logging.getLogger(__name__)
DEFAULT_ROOT = Path("/var/tmp/rollmill-sandboxes")
SYSTEM_LINKS = {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64", "/sbin": "usr/sbin"}
DEFAULT_HOST_UID = 65534  # nobody: the conventional identity that owns no file
BASE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass
class _Sandbox:
    id: str
    spec: SandboxSpec
    fs: SandboxFS
    cgroup: Cgroup | None
    mounts: list[int] = field(default_factory=list)  # held descriptors of spec.mounts' sources
    created: float = field(default_factory=time.monotonic)
    execs: int = 0
    oom_kills_before: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class BwrapBackend:
    """Sandboxes under `root` (one size-capped tmpfs each), limits from cgroup v1 when writable.

    Without cgroups the memory, pids and cpu limits cannot be enforced: the backend says so once
    and carries on with the namespace isolation alone.

    `allowed_paths`: host directories a spec may name as its workspace or a mount source, with no
    symlink below them (a server's policy); None trusts every path (a local run). Either way each
    path is opened once at create and used only through that descriptor.
    """

    name = "bwrap"

    def __init__(self, root: str | Path = DEFAULT_ROOT, bwrap: str | None = None, sweep: bool = True,
                 host_uid: int = DEFAULT_HOST_UID, allowed_paths: tuple[str, ...] | None = None):
        self.bwrap = bwrap or shutil.which("bwrap")
        if self.bwrap is None:
            raise SandboxError("bubblewrap is not installed (Debian: apt-get install bubblewrap)",
                               Status.INFRA_ERROR)
        if host_uid == 0:
            raise SandboxError("host_uid 0 would run sandboxes as the host's root; use an unprivileged uid")
        # setpriv drops to host_uid after the cgroup join; Popen(user=...) would do it without an
        # extra exec, but it disables vfork, and forking a training process costs far more
        self.setpriv = shutil.which("setpriv")
        if self.setpriv is None:
            raise SandboxError("setpriv is not installed (Debian: apt-get install util-linux)", Status.INFRA_ERROR)
        self.host_uid = host_uid
        self.allowed_paths = None if allowed_paths is None else tuple(allowed_paths)
        self.seccomp_program = seccomp.program() if seccomp.supported() else None
        if self.seccomp_program is None:
            log.warning("no seccomp filter for this architecture: sandboxes run without one")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        check_passable(self.root, host_uid)
        self.use_cgroups = cgroups_available()
        if not self.use_cgroups:
            log.warning("cgroup v1 is not writable here: sandbox memory/pids/cpu limits are NOT enforced")
        self._sandboxes: dict[str, _Sandbox] = {}
        self._lock = threading.Lock()
        if sweep:
            removed = self.sweep()
            if removed:
                log.info("sandbox sweep removed %d leftovers of dead processes under %s", removed, self.root)

    # -- lifecycle ---------------------------------------------------------------------------
    def create(self, spec: SandboxSpec, sandbox_id: str | None = None) -> str:
        sandbox_id = sandbox_id or f"sb-{uuid.uuid4().hex[:12]}"
        _check_id(sandbox_id)
        with self._lock:
            if sandbox_id in self._sandboxes:
                return sandbox_id
        workspace, mounts = self._open_sources(spec)
        box = _Sandbox(sandbox_id, spec, SandboxFS(self.root / sandbox_id, self.host_uid, len(spec.scratch_dirs)),
                       self._cgroup(sandbox_id) if self.use_cgroups else None, mounts)
        with self._lock:
            if sandbox_id in self._sandboxes:  # created meanwhile by another thread
                close_all([workspace, *mounts])
                return sandbox_id
            self._sandboxes[sandbox_id] = box
        try:
            self._owner_file(sandbox_id).write_text(json.dumps({"pid": os.getpid(), "boot": _proc_start(os.getpid())}))
            box.fs.create(spec.disk_bytes, workspace, spec.uid, spec.workdir, spec.network)
            if box.cgroup is not None:
                box.cgroup.create(spec.memory_bytes, spec.pids, spec.cpus)
        except OSError as e:
            self.destroy(sandbox_id)
            raise SandboxError(f"sandbox {sandbox_id}: create failed: {e}", Status.INFRA_ERROR) from e
        finally:
            close_all([workspace])
        if spec.network == "host":
            log.warning("sandbox %s shares the host network (spec.network='host')", sandbox_id)
        return sandbox_id

    def _open_sources(self, spec: SandboxSpec) -> tuple[int | None, list[int]]:
        """Descriptors of the workspace and the mount sources, each opened once, here."""
        held: list[int] = []
        try:
            workspace = None
            if spec.workspace is not None:
                workspace = open_held(spec.workspace, self.allowed_paths, "spec.workspace")
                held.append(workspace)
                if not is_dir(workspace):
                    raise SandboxError(f"spec.workspace {spec.workspace!r} is not a directory")
            for m in spec.mounts:
                held.append(open_held(m.source, self.allowed_paths, "mount source"))
        except BaseException:
            close_all(held)
            raise
        return workspace, held[1:] if workspace is not None else held

    def destroy(self, sandbox_id: str) -> None:
        _check_id(sandbox_id)
        with self._lock:
            box = self._sandboxes.pop(sandbox_id, None)
        cgroup = box.cgroup if box else (self._cgroup(sandbox_id) if self.use_cgroups else None)
        if cgroup is not None:
            cgroup.remove()
        if box is not None:
            with box.lock:
                close_all(box.mounts)
                box.mounts = []
                box.fs.destroy()
        else:  # a leftover of another process: no handles to close, just its mounts and files
            remove_tree(self.root / sandbox_id)
        self._owner_file(sandbox_id).unlink(missing_ok=True)

    def reset(self, sandbox_id: str) -> None:
        box = self._get(sandbox_id)
        if box.cgroup is not None:
            box.cgroup.kill_all()
        try:
            with box.lock:
                box.fs.reset()
        except OSError as e:
            raise SandboxError(f"sandbox {sandbox_id}: reset failed: {e}", Status.INFRA_ERROR) from e

    def list(self) -> list[str]:
        with self._lock:
            return sorted(self._sandboxes)

    def sweep(self) -> int:
        """Remove sandboxes whose owning process is dead (crashed runs), and their cgroups."""
        removed = 0
        live_owned = set(self._sandboxes)
        candidates = {p.name for p in self.root.iterdir() if p.is_dir()} | {
            p.name[: -len(".owner")] for p in self.root.glob("*.owner")}
        if self.use_cgroups:
            prefix = self.cgroup_prefix
            candidates |= {name[len(prefix):] for name in leftover_cgroups() if name.startswith(prefix)}
        for sid in sorted(candidates - live_owned):
            if self._owner_alive(sid):
                continue
            if self.use_cgroups:
                self._cgroup(sid).remove()
            remove_tree(self.root / sid)
            self._owner_file(sid).unlink(missing_ok=True)
            removed += 1
        return removed

    def close(self) -> None:
        """Destroy every sandbox this backend holds."""
        for sid in self.list():
            self.destroy(sid)

    # -- commands ------------------------------------------------------------------------------
    def exec(self, sandbox_id, argv=None, *, script=None, timeout_s=None, cwd=None, env=None,
             stdin=None, max_output_bytes=None) -> ExecResult:
        if (argv is None) == (script is None):
            raise SandboxError("exec needs exactly one of argv or script")
        box = self._get(sandbox_id)
        spec = box.spec
        command = list(argv) if argv is not None else ["/bin/bash", "-c", script]
        timeout = spec.exec_timeout_s if timeout_s is None else timeout_s
        run = self._run(box, command, timeout, cwd, env, stdin, max_output_bytes or spec.max_output_bytes)
        if isinstance(run, ExecResult):
            return run
        return ExecResult(
            status=self._status(box, run), exit_code=run.exit_code,
            stdout=run.stdout.decode(errors="replace"), stderr=run.stderr.decode(errors="replace"),
            duration_s=run.duration_s, truncated=run.truncated, output_bytes=run.output_bytes,
            limit="exec_timeout" if run.timed_out else None,
        )

    def put(self, sandbox_id: str, path: str, data: bytes) -> None:
        box = self._get(sandbox_id)
        if len(data) > box.spec.max_file_bytes:
            raise SandboxError(f"put {path}: {len(data)} bytes is over max_file_bytes={box.spec.max_file_bytes}")
        run = self._run(box, ["/bin/sh", "-c", PUT_SCRIPT, "put", path], box.spec.exec_timeout_s, None, None, data, 4096)
        if isinstance(run, ExecResult) or run.exit_code != 0 or run.timed_out:
            raise SandboxError(f"put {path}: {_why(run)}")

    def get(self, sandbox_id: str, path: str) -> bytes:
        box = self._get(sandbox_id)
        limit = box.spec.max_file_bytes
        read = f'test -f "$1" || {{ echo "no such file" >&2; exit 2; }}; head -c {limit + 1} -- "$1"'
        run = self._run(box, ["/bin/sh", "-c", read, "get", path], box.spec.exec_timeout_s, None, None, None,
                        2 * limit + 2)
        if isinstance(run, ExecResult) or run.exit_code != 0 or run.timed_out:
            raise SandboxError(f"get {path}: {_why(run)}")
        if len(run.stdout) > limit:
            raise SandboxError(f"get {path}: file is over max_file_bytes={limit}")
        return run.stdout

    def stats(self, sandbox_id: str) -> SandboxStats:
        box = self._get(sandbox_id)
        measured = box.cgroup.stats() if box.cgroup is not None else {}
        return SandboxStats(**measured, disk_used_bytes=box.fs.disk_used(), execs=box.execs,
                            age_s=time.monotonic() - box.created)

    # -- internals -----------------------------------------------------------------------------
    def _run(self, box: _Sandbox, command, timeout, cwd, env, stdin, max_output) -> RawRun | ExecResult:
        fds: list[int] = []
        try:
            with box.lock:
                handles = box.fs.handles()
                fds += handles.values()
                mounts = [os.dup(fd) for fd in box.mounts]
                fds += mounts
            seccomp_fd = memfd("seccomp", self.seccomp_program) if self.seccomp_program else None
            fds += [seccomp_fd] if seccomp_fd is not None else []
            options = self.bwrap_options(box, cwd, env, handles, mounts, seccomp_fd)
            args_fd = memfd("args", b"".join(a.encode() + b"\0" for a in options))
            fds.append(args_fd)
        except ValueError as e:  # e.g. a NUL byte in an argument
            close_all(fds)
            return ExecResult(Status.ERROR, None, message=f"bad command: {e}")
        argv = [self.setpriv, f"--reuid={self.host_uid}", f"--regid={self.host_uid}", "--clear-groups",
                self.bwrap, "--args", str(args_fd), "--", *command]
        if box.cgroup is not None:
            argv = ["/bin/sh", "-c", JOIN_CGROUPS, "join", *box.cgroup.procs_files(), "--", *argv]
        with self._lock:
            box.execs += 1
        box.oom_kills_before = box.cgroup.oom_kills() if box.cgroup is not None else 0
        try:
            run = run_capped(argv, timeout_s=timeout, max_output_bytes=max_output, stdin=stdin, env={},
                             pass_fds=tuple(fds))
        except ValueError as e:  # e.g. a NUL byte in the command
            return ExecResult(Status.ERROR, None, message=f"bad command: {e}")
        except OSError as e:
            return ExecResult(Status.INFRA_ERROR, None, message=f"could not start bwrap: {e}")
        finally:
            close_all(fds)
        return _setup_failure(run) or run

    def bwrap_options(self, box: _Sandbox, cwd: str | None, env: dict | None, handles: dict[str, int],
                      mounts: list[int], seccomp_fd: int | None) -> list[str]:
        """bwrap's options for one exec, given the descriptors it inherits (public so users can
        see exactly what runs). They reach bwrap through `--args FD`, so neither a host process
        listing nor `/proc/1/cmdline` inside the sandbox shows them; the command follows `--`."""
        spec = box.spec
        if any("\0" in a for a in [*(env or {}), *(env or {}).values(), cwd or ""]):
            raise ValueError("embedded null byte")
        argv = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
                "--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox", "--uid", str(spec.uid),
                "--gid", str(spec.uid), "--ro-bind", "/usr", "/usr"]
        if spec.network == "host":
            argv.append("--share-net")
        for link, target in SYSTEM_LINKS.items():
            argv += ["--symlink", target, link]
        argv += ["--ro-bind-fd", str(handles["etc"]), "/etc",
                 "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev",
                 "--bind-fd", str(handles["merged"]), spec.workdir]
        for i, target in enumerate(spec.scratch_dirs):
            argv += ["--bind-fd", str(handles[f"scratch/{i}"]), target]
        for m, fd in zip(spec.mounts, mounts):
            argv += ["--bind-fd" if m.writable else "--ro-bind-fd", str(fd), m.target]
        variables = {"PATH": BASE_PATH, "HOME": spec.workdir, "LANG": "C.UTF-8", **spec.env, **(env or {})}
        for key, value in variables.items():
            argv += ["--setenv", key, value]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        # the root itself is bwrap's tmpfs: read-only, so writes land only in capped, listed places
        return argv + ["--remount-ro", "/", "--chdir", cwd or spec.workdir]

    def _status(self, box: _Sandbox, run: RawRun) -> Status:
        if run.timed_out:
            return Status.TIMEOUT
        if box.cgroup is not None and run.exit_code in (137, -9) and box.cgroup.oom_kills() > box.oom_kills_before:
            return Status.OOM
        return Status.OK

    def _get(self, sandbox_id: str) -> _Sandbox:
        with self._lock:
            box = self._sandboxes.get(sandbox_id)
        if box is None:
            raise SandboxError(f"unknown sandbox {sandbox_id!r}")
        return box

    @property
    def cgroup_prefix(self) -> str:
        """Cgroup names carry a tag of the state root: a sweep must never touch the sandboxes of
        another backend (another root, another process) that shares the cgroup hierarchy."""
        return hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:8] + "-"

    def _cgroup(self, sandbox_id: str) -> Cgroup:
        return Cgroup(self.cgroup_prefix + sandbox_id)

    def _owner_file(self, sandbox_id: str) -> Path:
        return self.root / f"{sandbox_id}.owner"

    def _owner_alive(self, sandbox_id: str) -> bool:
        try:
            owner = json.loads(self._owner_file(sandbox_id).read_text())
        except (OSError, ValueError):
            return False
        return _proc_start(owner["pid"]) == owner["boot"]


# bwrap's own setup failures print "bwrap: ..." and exit 1; these ones are the caller's mistake
USER_ERRORS = (b"bwrap: execvp", b"bwrap: Can't chdir")


def _setup_failure(run: RawRun) -> ExecResult | None:
    """An ExecResult when bwrap (or the cgroup join, exit 125) failed before the command ran."""
    if run.exit_code == 1 and run.stderr.startswith(b"bwrap: "):
        status = Status.ERROR if run.stderr.startswith(USER_ERRORS) else Status.INFRA_ERROR
    elif run.exit_code == 125 and not run.stdout and not run.stderr.strip():
        status = Status.INFRA_ERROR
    else:
        return None
    stderr = run.stderr.decode(errors="replace")
    return ExecResult(status, run.exit_code, stderr=stderr, message=f"the sandbox could not start the command: {stderr.strip()}")


def _check_id(sandbox_id: str) -> None:
    if not sandbox_id or len(sandbox_id) > 64 or not all(c.isalnum() or c in "-_." for c in sandbox_id) \
            or sandbox_id.startswith("."):
        raise SandboxError(f"bad sandbox id {sandbox_id!r}: use 1-64 letters, digits, '-', '_' or '.'")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks: a reused pid has another one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _why(run) -> str:
    if isinstance(run, ExecResult):
        return run.message or run.stderr
    if run.timed_out:
        return "timed out"
    return run.stderr.decode(errors="replace").strip() or f"exit code {run.exit_code}"


__all__ = ["BwrapBackend", "DEFAULT_ROOT", "mounts_under"]
