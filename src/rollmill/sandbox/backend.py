"""The backend interface every sandbox implementation offers (local, remote, any isolation).

A backend owns sandboxes by id. `create` is idempotent on the id; `destroy` is idempotent and
leaves nothing behind. Commands are argv lists or, for `script`, a bash script.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rollmill.sandbox.spec import ExecResult, SandboxSpec, SandboxStats

# Writes stdin to "$1" from inside a sandbox, so the path resolves there (never on the host).
PUT_SCRIPT = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'


@runtime_checkable
class SandboxBackend(Protocol):
    name: str

    def create(self, spec: SandboxSpec, sandbox_id: str | None = None) -> str:
        """Build a sandbox and return its id (a new one when `sandbox_id` is None)."""
        ...

    def exec(
        self,
        sandbox_id: str,
        argv: list[str] | None = None,
        *,
        script: str | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        max_output_bytes: int | None = None,
    ) -> ExecResult:
        """Run one command to its end or its timeout; the whole process tree dies with it."""
        ...

    def put(self, sandbox_id: str, path: str, data: bytes) -> None:
        """Write a file inside the sandbox (parents created); raises SandboxError."""
        ...

    def get(self, sandbox_id: str, path: str) -> bytes:
        """Read a file inside the sandbox; raises SandboxError when missing or too large."""
        ...

    def reset(self, sandbox_id: str) -> None:
        """Back to the pristine workspace: every write since create is dropped."""
        ...

    def stats(self, sandbox_id: str) -> SandboxStats: ...

    def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything it made; a no-op for an unknown id."""
        ...

    def list(self) -> list[str]:
        """Ids of the live sandboxes this backend holds."""
        ...

    def sweep(self) -> int:
        """Remove leftovers of earlier runs (crashed processes); return how many were removed."""
        ...
