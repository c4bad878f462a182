"""Sandboxes: isolated workspaces for agent commands (bubblewrap by default), a pool, and HTTP."""

from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.spec import ExecResult, Mount, SandboxError, SandboxSpec, SandboxStats, Status

BACKENDS = ("bwrap", "process", "remote", "docker", "podman")


def make_backend(name: str = "bwrap", **kwargs) -> SandboxBackend:
    """A backend by name: bwrap (default, isolated), process (development, no isolation), or
    remote (`url=`, `token=`: a `rollmill sandbox serve` node), docker or podman (`image=`; needs a
    daemon; containers are never privileged)."""
    if name == "bwrap":
        from rollmill.sandbox.bwrap import BwrapBackend
        return BwrapBackend(**kwargs)
    if name == "process":
        from rollmill.sandbox.process import ProcessBackend
        return ProcessBackend(**kwargs)
    if name == "remote":
        from rollmill.sandbox.client import RemoteBackend
        return RemoteBackend(**kwargs)
    if name in ("docker", "podman"):
        from rollmill.sandbox.docker import DockerBackend
        return DockerBackend(cli=name, **kwargs)
    raise ValueError(f"unknown sandbox backend {name!r}; allowed: {list(BACKENDS)}")


__all__ = ["BACKENDS", "ExecResult", "Mount", "SandboxBackend", "SandboxError", "SandboxSpec",
           "SandboxStats", "Status", "make_backend"]
