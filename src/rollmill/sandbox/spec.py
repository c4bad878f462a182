"""What a sandbox is (`SandboxSpec`) and what running something in it returns (`ExecResult`).

Every limit lives in the spec, so nothing about isolation is hard-coded in a backend. Results carry
a typed status, so a timeout or an OOM is never mistaken for a command that simply failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from rollmill.config.base import Strict

MiB = 1024 * 1024


class Status(str, enum.Enum):
    """How an operation ended.

    ok: the command ran to its end (its own exit code says whether it succeeded);
    timeout: a wall-clock limit killed it (`ExecResult.limit` names which);
    oom: the memory limit killed it;
    error: the request was wrong (unknown sandbox, bad path, file too large);
    infra_error: the sandbox machinery itself failed (the backend could not start the command).
    """

    OK = "ok"
    TIMEOUT = "timeout"
    OOM = "oom"
    ERROR = "error"
    INFRA_ERROR = "infra_error"


class Mount(Strict):
    """A host path made visible inside the sandbox (read-only unless `writable`)."""

    source: str
    target: str
    writable: bool = False


class SandboxSpec(Strict):
    """Everything a backend needs to build one isolated workspace.

    `workspace` is a host directory whose content is the pristine state of `workdir`: the sandbox
    sees a copy-on-write view of it, so writes never touch the source and `reset` drops them.
    `disk_bytes` caps what the sandbox can write in total (workspace changes, /tmp, `scratch_dirs`).
    """

    workspace: str | None = None
    workdir: str = "/workspace"
    scratch_dirs: list[str] = Field(default_factory=lambda: ["/tmp", "/logs"])
    mounts: list[Mount] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    uid: int = Field(0, ge=0)
    cpus: float = Field(1.0, gt=0)
    memory_bytes: int = Field(512 * MiB, gt=0)
    pids: int = Field(256, gt=0)
    disk_bytes: int = Field(256 * MiB, gt=0)
    network: Literal["none", "host"] = "none"
    exec_timeout_s: float = Field(30.0, gt=0)
    ttl_s: float = Field(3600.0, gt=0)
    max_output_bytes: int = Field(1 * MiB, gt=0)
    max_file_bytes: int = Field(64 * MiB, gt=0)

    @model_validator(mode="after")
    def _paths_are_plain(self) -> "SandboxSpec":
        texts = [self.workspace or "", self.workdir, *self.scratch_dirs, *self.env, *self.env.values(),
                 *(p for m in self.mounts for p in (m.source, m.target))]
        if any("\0" in t for t in texts):
            raise ValueError("paths and env entries must not contain NUL bytes")
        if any("=" in key or not key for key in self.env):
            raise ValueError("env names must be non-empty and must not contain '='")
        inside = [self.workdir, *self.scratch_dirs, *(m.target for m in self.mounts)]
        if any(not p.startswith("/") for p in inside):
            raise ValueError(f"sandbox paths must be absolute: {inside}")
        return self


@dataclass
class ExecResult:
    """The outcome of one command. `stdout`/`stderr` keep the head and tail of long output;
    `truncated` says bytes were dropped and `output_bytes` how many the command wrote in all."""

    status: Status
    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    truncated: bool = False
    output_bytes: int = 0
    limit: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """The command ran to its end and exited 0."""
        return self.status is Status.OK and self.exit_code == 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExecResult":
        """Inverse of to_dict; keys this version does not know (a newer server's) are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "status": Status(d["status"])})


@dataclass
class SandboxStats:
    """Resource use so far; None where the backend cannot measure it."""

    memory_peak_bytes: int | None = None
    cpu_seconds: float | None = None
    pids: int | None = None
    disk_used_bytes: int | None = None
    execs: int = 0
    age_s: float = 0.0
    extra: dict = field(default_factory=dict)


class SandboxError(RuntimeError):
    """An operation could not be carried out; `status` says whose fault (ERROR or INFRA_ERROR)."""

    def __init__(self, message: str, status: Status = Status.ERROR):
        super().__init__(message)
        self.status = status
