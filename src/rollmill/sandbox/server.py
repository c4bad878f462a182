"""Serve a sandbox backend over HTTP, so rollout workers on other machines use its sandboxes.

`make_app` maps each backend operation to one JSON endpoint (files travel as raw bytes), and
`RemoteBackend` (rollmill.sandbox.client) is the matching client. A bearer token guards every
endpoint but /health; serving without one takes an explicit `--insecure-no-token`. Anyone holding
the token runs commands on this host, and a spec's `workspace` and `mounts` name host paths, so
treat the token as host access.

Abuse is refused, not suffered: operator ceilings (rollmill.sandbox.limits: 413, 400 naming the
field), caps on sandboxes and running commands (429), idle TTLs (rollmill.sandbox.tracker: 404
"expired"), a /health that needs no thread, and a SIGTERM that kills every command first.
"""

from __future__ import annotations

import base64
import functools
import hmac
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Callable

import anyio
from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.limits import BodyLimit, Limits, Refused
from rollmill.sandbox.spec import SandboxError, SandboxSpec, Status
from rollmill.sandbox.tracker import SandboxTracker

log = logging.getLogger(__name__)
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


def make_app(backend: SandboxBackend, token: str | None, *, limits: Limits | None = None,
             allowed_paths: tuple[str, ...] = (), allow_host_network: bool = False,
             allow_no_token: bool = False, reap_interval_s: float = 1.0) -> FastAPI:
    """The HTTP API over `backend`; every endpoint but /health needs `Bearer <token>`.

    Without a token it refuses to build unless `allow_no_token`. `limits` are the operator's
    ceilings (default `Limits()`); uploads are also capped at the sandbox's `max_file_bytes`.
    Sandboxes created through the app are reaped after `ttl_s` idle (checked every
    `reap_interval_s`) and destroyed when the app shuts down. A client names host paths
    (`workspace`, mount sources): only those under `allowed_paths` are accepted, and
    `network: host` only when allowed, so a token holder cannot mount the host's root or reach
    the network.
    """
    if not token and not allow_no_token:
        raise ValueError("a sandbox server needs a token; pass allow_no_token=True to serve without one")
    limits = limits or Limits()
    tracker = SandboxTracker(backend, limits.max_sandboxes, limits.max_concurrent_execs, reap_interval_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        tracker.start()
        try:
            yield
        finally:
            await in_own_thread(tracker.close)

    app = FastAPI(title="rollmill sandbox server", lifespan=lifespan)
    app.state.tracker = tracker
    # innermost middleware: its 413, raised where a route reads the body, reaches the app's
    # handlers unwrapped (through a BaseHTTPMiddleware it would arrive as an ExceptionGroup)
    app.add_middleware(BodyLimit, limits=limits)
    _add_error_handling(app)
    if token:
        _add_auth(app, token)
    _add_lifecycle_routes(app, backend, tracker, limits,
                          lambda spec: check_spec_policy(spec, allowed_paths, allow_host_network))
    _add_command_routes(app, backend, tracker, limits)
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


def _error(code: int, message: str, status: Status = Status.ERROR, headers: dict | None = None,
           **extra) -> JSONResponse:
    if code == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"detail": message, "status": status.value, **extra}, status_code=code, headers=headers)


def _add_error_handling(app: FastAPI) -> None:
    @app.exception_handler(SandboxError)
    async def sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        if exc.status is Status.INFRA_ERROR:
            return _error(503, str(exc), exc.status)
        return _error(404 if "unknown sandbox" in str(exc) else 400, str(exc))

    # refusals (Refused) and FastAPI's own (404, 405) in the same shape; a busy or closing
    # server (429, 503) is the client's infra problem, not a wrong request
    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = Status.INFRA_ERROR if exc.status_code in (429, 503) else Status.ERROR
        return _error(exc.status_code, str(exc.detail), status, exc.headers, **getattr(exc, "extra", {}))

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


# Plain `def` endpoints run in FastAPI's threadpool; commands (exec, put, get) are async and wait
# in the tracker's own threads, so a full exec cap never starves the other endpoints.
def _add_lifecycle_routes(app: FastAPI, backend: SandboxBackend, tracker: SandboxTracker, limits: Limits,
                          policy: Callable[[SandboxSpec], None]) -> None:
    # async and backend-free: answered at once even when every thread is busy
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "backend": backend.name, **tracker.load()}

    @app.post("/sandboxes", status_code=201)
    def create(body: CreateRequest) -> dict:
        policy(body.spec)
        limits.check_spec(body.spec)
        return {"id": tracker.create(body.spec, body.id)}

    @app.get("/sandboxes")
    def list_sandboxes() -> dict:
        return {"ids": backend.list()}

    @app.delete("/sandboxes/{sandbox_id}", status_code=204)
    def destroy(sandbox_id: SandboxId) -> Response:
        backend.destroy(sandbox_id)
        tracker.forget(sandbox_id)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/reset", status_code=204)
    def reset(sandbox_id: SandboxId) -> Response:
        with tracker.use(sandbox_id):
            backend.reset(sandbox_id)
        return Response(status_code=204)

    @app.get("/sandboxes/{sandbox_id}/stats")
    def stats(sandbox_id: SandboxId) -> dict:
        with tracker.use(sandbox_id):
            return asdict(backend.stats(sandbox_id))

    @app.post("/sweep")
    def sweep() -> dict:
        return {"removed": backend.sweep()}


def _add_command_routes(app: FastAPI, backend: SandboxBackend, tracker: SandboxTracker, limits: Limits) -> None:
    @app.post("/sandboxes/{sandbox_id}/exec")
    async def exec_command(sandbox_id: SandboxId, body: ExecRequest) -> dict:
        limits.check_exec(body.timeout_s, body.max_output_bytes)
        call = functools.partial(backend.exec, sandbox_id, body.argv, script=body.script, timeout_s=body.timeout_s,
                                 cwd=body.cwd, env=body.env, stdin=body.stdin,
                                 max_output_bytes=body.max_output_bytes)
        return (await tracker.run_command(sandbox_id, call)).to_dict()

    @app.get("/sandboxes/{sandbox_id}/files")
    async def get_file(sandbox_id: SandboxId, path: FilePath) -> Response:
        data = await tracker.run_command(sandbox_id, functools.partial(backend.get, sandbox_id, path))
        return Response(data, media_type="application/octet-stream")

    @app.put("/sandboxes/{sandbox_id}/files", status_code=204)
    async def put_file(sandbox_id: SandboxId, path: FilePath, request: Request) -> Response:
        spec = tracker.spec(sandbox_id)
        cap = (limits.max_file_bytes, "--max-file") if spec is None else (spec.max_file_bytes, "spec.max_file_bytes")
        data = await _read_capped(request, *cap)
        await tracker.run_command(sandbox_id, functools.partial(backend.put, sandbox_id, path, data))
        return Response(status_code=204)


async def _read_capped(request: Request, cap: int, source: str) -> bytes:
    """The request body, or 413 as soon as it is known to be over `cap` bytes (set by `source`)."""
    too_large = Refused(413, f"the upload is over the {cap}-byte limit ({source})")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise too_large
    return bytes(data)


async def in_own_thread(call: Callable[[], None]) -> None:
    """Run a blocking `call` (closing the tracker) off the event loop, in a thread of its own: not in
    FastAPI's threadpool, since a shutdown must not wait for a free thread there."""
    await anyio.to_thread.run_sync(call, limiter=anyio.CapacityLimiter(1))
