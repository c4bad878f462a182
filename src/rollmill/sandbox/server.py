"""Serve a sandbox backend over HTTP, so rollout workers on other machines use its sandboxes.

`make_app` maps each backend operation to one JSON endpoint (files travel as raw bytes), and
`RemoteBackend` (rollmill.sandbox.client) is the matching client. A bearer token guards every
endpoint but /health. Anyone holding the token runs commands on this host, and a spec's
`workspace` and `mounts` name host paths, so treat the token as host access.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Annotated

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rollmill.sandbox import make_backend
from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.spec import MiB, SandboxError, SandboxSpec, Status

log = logging.getLogger(__name__)
TOKEN_ENV = "ROLLMILL_SANDBOX_TOKEN"
DEFAULT_MAX_UPLOAD_BYTES = 64 * MiB
# the same ids BwrapBackend accepts; checked here too because other backends build paths from them
ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
SandboxId = Annotated[str, PathParam(pattern=ID_PATTERN)]
# strings that become argv or environment entries: a NUL byte would crash the exec, not fail it
Arg = Annotated[str, Field(pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, Field(pattern=r"^[^=\x00]+$")]
FilePath = Annotated[str, Query(min_length=1, pattern=r"^[^\x00]+$")]


class CreateRequest(BaseModel):
    """Body of `POST /sandboxes`."""

    model_config = ConfigDict(extra="forbid")
    spec: SandboxSpec = Field(default_factory=SandboxSpec)
    id: str | None = Field(None, pattern=ID_PATTERN)


class ExecRequest(BaseModel):
    """Body of `POST /sandboxes/{id}/exec`: the arguments of `SandboxBackend.exec`, stdin as base64."""

    model_config = ConfigDict(extra="forbid")
    argv: list[Arg] | None = Field(None, min_length=1)
    script: Arg | None = None
    timeout_s: float | None = Field(None, gt=0)
    cwd: Arg | None = None
    env: dict[EnvName, Arg] | None = None
    stdin_b64: str | None = None
    max_output_bytes: int | None = Field(None, gt=0)

    @field_validator("stdin_b64")
    @classmethod
    def _is_base64(cls, value: str | None) -> str | None:
        if value is not None:
            base64.b64decode(value, validate=True)
        return value

    @property
    def stdin(self) -> bytes | None:
        return None if self.stdin_b64 is None else base64.b64decode(self.stdin_b64)


def make_app(backend: SandboxBackend, token: str | None,
             max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, allowed_paths: tuple[str, ...] = (),
             allow_host_network: bool = False) -> FastAPI:
    """The HTTP API over `backend`; every endpoint but /health needs `Bearer <token>` when set.

    Uploads are capped at the sandbox's `max_file_bytes` (for sandboxes created through this app)
    and at `max_upload_bytes` in any case. A client names host paths (`workspace`, mount sources):
    only those under `allowed_paths` are accepted, and `network: host` only when allowed, so a
    token holder cannot mount the host's root or reach the network.
    """
    app = FastAPI(title="rollmill sandbox server")
    _add_error_handling(app)
    if token is not None:
        _add_auth(app, token)
    upload_caps: dict[str, int] = {}
    _add_lifecycle_routes(app, backend, upload_caps, max_upload_bytes,
                          lambda spec: check_spec_policy(spec, allowed_paths, allow_host_network))
    _add_command_routes(app, backend, upload_caps, max_upload_bytes)
    return app


def check_spec_policy(spec: SandboxSpec, allowed_paths: tuple[str, ...], allow_host_network: bool) -> None:
    """Raise SandboxError when a client's spec names a host path outside `allowed_paths` or asks
    for the host network without permission."""
    if spec.network == "host" and not allow_host_network:
        raise SandboxError("network 'host' is not allowed by this server")
    roots = [os.path.realpath(p) for p in allowed_paths]
    for path in [spec.workspace, *(m.source for m in spec.mounts)]:
        if path is None:
            continue
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
            raise SandboxError(f"host path {path!r} is outside the server's allowed paths {list(allowed_paths)}")


def _error(code: int, message: str, status: Status = Status.ERROR, **extra) -> JSONResponse:
    return JSONResponse({"detail": message, "status": status.value, **extra}, status_code=code,
                        headers={"WWW-Authenticate": "Bearer"} if code == 401 else None)


def _add_error_handling(app: FastAPI) -> None:
    @app.exception_handler(SandboxError)
    async def sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        if exc.status is Status.INFRA_ERROR:
            return _error(503, str(exc), exc.status)
        return _error(404 if "unknown sandbox" in str(exc) else 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON")
        fields = [".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]) for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors))
        return _error(422, message, field=fields[0])

    # a middleware rather than exception_handler(Exception): Starlette re-raises after that
    # handler, so uvicorn would log every failure a second time
    @app.middleware("http")
    async def internal_error(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("sandbox server: %s %s failed", request.method, request.url.path)
            return _error(500, f"{type(exc).__name__}: {exc}", Status.INFRA_ERROR)


def _add_auth(app: FastAPI, token: str) -> None:
    expected = f"Bearer {token}".encode()

    # a middleware, so a request without the token learns nothing (not even that its body is invalid)
    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if request.url.path != "/health" and not hmac.compare_digest(given, expected):
            return _error(401, "missing or wrong bearer token")
        return await call_next(request)


# Plain `def` endpoints: FastAPI runs them in its threadpool, so a long exec never blocks the others.
def _add_lifecycle_routes(app: FastAPI, backend: SandboxBackend, upload_caps: dict[str, int],
                          max_upload_bytes: int, policy) -> None:
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "backend": backend.name, "sandboxes": len(backend.list())}

    @app.post("/sandboxes", status_code=201)
    def create(body: CreateRequest) -> dict:
        policy(body.spec)
        sandbox_id = backend.create(body.spec, body.id)
        upload_caps.setdefault(sandbox_id, min(body.spec.max_file_bytes, max_upload_bytes))
        return {"id": sandbox_id}

    @app.get("/sandboxes")
    def list_sandboxes() -> dict:
        return {"ids": backend.list()}

    @app.delete("/sandboxes/{sandbox_id}", status_code=204)
    def destroy(sandbox_id: SandboxId) -> Response:
        backend.destroy(sandbox_id)
        upload_caps.pop(sandbox_id, None)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/reset", status_code=204)
    def reset(sandbox_id: SandboxId) -> Response:
        backend.reset(sandbox_id)
        return Response(status_code=204)

    @app.get("/sandboxes/{sandbox_id}/stats")
    def stats(sandbox_id: SandboxId) -> dict:
        return asdict(backend.stats(sandbox_id))

    @app.post("/sweep")
    def sweep() -> dict:
        return {"removed": backend.sweep()}


def _add_command_routes(app: FastAPI, backend: SandboxBackend, upload_caps: dict[str, int],
                        max_upload_bytes: int) -> None:
    @app.post("/sandboxes/{sandbox_id}/exec")
    def exec_command(sandbox_id: SandboxId, body: ExecRequest) -> dict:
        result = backend.exec(sandbox_id, body.argv, script=body.script, timeout_s=body.timeout_s,
                              cwd=body.cwd, env=body.env, stdin=body.stdin,
                              max_output_bytes=body.max_output_bytes)
        return result.to_dict()

    @app.get("/sandboxes/{sandbox_id}/files")
    def get_file(sandbox_id: SandboxId, path: FilePath) -> Response:
        return Response(backend.get(sandbox_id, path), media_type="application/octet-stream")

    # async to stream the body against its cap; the backend call still goes to the threadpool
    @app.put("/sandboxes/{sandbox_id}/files", status_code=204)
    async def put_file(sandbox_id: SandboxId, path: FilePath, request: Request) -> Response:
        data = await _read_capped(request, upload_caps.get(sandbox_id, max_upload_bytes))
        await run_in_threadpool(backend.put, sandbox_id, path, data)
        return Response(status_code=204)


async def _read_capped(request: Request, cap: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over `cap` bytes."""
    too_large = HTTPException(413, f"the upload is over the {cap}-byte limit")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise too_large
    return bytes(data)


class ServerThread:
    """uvicorn serving `app` in a daemon thread; a context manager (tests, embedding in a process).

    Port 0 picks a free port; `url` has the real one once started.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0):
        self.host = host
        self.start_timeout_s = start_timeout_s
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, name="rollmill-sandbox-server", daemon=True)
        self.url: str | None = None

    def start(self) -> "ServerThread":
        """Start serving and wait until the socket is bound."""
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the sandbox server failed to start; uvicorn logged why")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the sandbox server did not start within {self.start_timeout_s}s")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(backend: SandboxBackend, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          allowed_paths: tuple[str, ...] = (), allow_host_network: bool = False) -> None:
    """Serve `backend` with uvicorn until interrupted (blocking)."""
    log.info("serving %s sandboxes on %s:%d (%s; host paths allowed: %s)", backend.name, host, port,
             "token required" if token else "NO token", list(allowed_paths) or "none")
    app = make_app(backend, token, allowed_paths=allowed_paths, allow_host_network=allow_host_network)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()


def serve_main(args: argparse.Namespace) -> int:
    """Run `rollmill sandbox serve`; return the exit code."""
    try:
        token = _read_token(args.token_file)
    except (OSError, ValueError) as err:
        print(f"rollmill sandbox serve: {err}", file=sys.stderr)
        return 2
    if token is None and not _is_loopback(args.host):
        print(f"rollmill sandbox serve: refusing to serve on {args.host!r} without a token "
              f"(use --token-file or ${TOKEN_ENV}, or bind 127.0.0.1)", file=sys.stderr)
        return 2
    try:
        backend = make_backend(args.backend, **({"root": args.root} if args.root else {}))
    except SandboxError as err:
        print(f"rollmill sandbox serve: {err}", file=sys.stderr)
        return 1
    # uvicorn re-raises the signal that stopped it; as an exception it lets the sandboxes be destroyed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve(backend, args.host, args.port, token, tuple(args.allow_path), args.allow_host_network)
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


def _read_token(token_file: str | None) -> str | None:
    # never a --token flag: command lines are visible to every user of the host
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    with open(token_file) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"the token file {token_file} is empty")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
