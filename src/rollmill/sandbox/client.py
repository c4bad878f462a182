"""`RemoteBackend`: the sandboxes of a `rollmill sandbox serve` server, behind the local interface.

A rollout worker uses it exactly like a local backend: the same calls, the same `ExecResult`s and
the same `SandboxError`s. A wrong request (unknown or expired sandbox, bad spec, over a ceiling of
the server) raises with status ERROR and the server's reason; an unreachable, failing, too slow or
busy server (429: at its cap on sandboxes or running commands) raises with INFRA_ERROR.
"""

from __future__ import annotations

import base64
import logging
import threading
from urllib.parse import quote

import httpx

from rollmill.sandbox.spec import ExecResult, SandboxError, SandboxSpec, SandboxStats, Status

log = logging.getLogger(__name__)
DEFAULT_EXEC_TIMEOUT_S = SandboxSpec.model_fields["exec_timeout_s"].default


class RemoteBackend:
    """A `SandboxBackend` over HTTP.

    Operations that run in the sandbox (exec, put, get, reset) wait for their own timeout plus
    `margin_s`: the `timeout_s` given to exec, else the spec's `exec_timeout_s` for sandboxes
    created through this client, else the spec default. Other requests wait `timeout_s`.
    `list` shows every sandbox of the server; `close` destroys those created through this client.
    """

    name = "remote"

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0, margin_s: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.margin_s = margin_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._exec_timeouts: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def create(self, spec: SandboxSpec, sandbox_id: str | None = None) -> str:
        """Build a sandbox on the server and return its id (a new one when `sandbox_id` is None)."""
        body = {"spec": spec.model_dump(mode="json"), "id": sandbox_id}
        sandbox_id = self._request("POST", "/sandboxes", json=body).json()["id"]
        with self._lock:
            self._exec_timeouts.setdefault(sandbox_id, spec.exec_timeout_s)
        return sandbox_id

    def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox; a no-op for an unknown id."""
        self._request("DELETE", f"/sandboxes/{_quote(sandbox_id)}")
        with self._lock:
            self._exec_timeouts.pop(sandbox_id, None)

    def reset(self, sandbox_id: str) -> None:
        """Back to the pristine workspace."""
        self._request("POST", f"/sandboxes/{_quote(sandbox_id)}/reset", timeout=self._budget(sandbox_id))

    def list(self) -> list[str]:
        """Ids of every live sandbox on the server."""
        return self._request("GET", "/sandboxes").json()["ids"]

    def sweep(self) -> int:
        """Have the server remove leftovers of crashed runs; return how many it removed."""
        return self._request("POST", "/sweep").json()["removed"]

    def stats(self, sandbox_id: str) -> SandboxStats:
        """The sandbox's resource use so far."""
        return SandboxStats(**self._request("GET", f"/sandboxes/{_quote(sandbox_id)}/stats").json())

    def close(self) -> None:
        """Destroy the sandboxes created through this client, then close the connection pool."""
        with self._lock:
            owned = list(self._exec_timeouts)
        for sandbox_id in owned:
            try:
                self.destroy(sandbox_id)
            except SandboxError as err:
                log.warning("could not destroy remote sandbox %s: %s", sandbox_id, err)
        self._http.close()

    def __enter__(self) -> "RemoteBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands ----------------------------------------------------------------------------
    def exec(self, sandbox_id, argv=None, *, script=None, timeout_s=None, cwd=None, env=None,
             stdin=None, max_output_bytes=None) -> ExecResult:
        """Run one command in the sandbox to its end or its timeout."""
        body = {
            "argv": None if argv is None else list(argv), "script": script, "timeout_s": timeout_s,
            "cwd": cwd, "env": env, "max_output_bytes": max_output_bytes,
            "stdin_b64": None if stdin is None else base64.b64encode(stdin).decode(),
        }
        response = self._request("POST", f"/sandboxes/{_quote(sandbox_id)}/exec", json=body,
                                 timeout=self._budget(sandbox_id, timeout_s))
        return ExecResult.from_dict(response.json())

    def put(self, sandbox_id: str, path: str, data: bytes) -> None:
        """Write a file inside the sandbox (parents created)."""
        self._request("PUT", f"/sandboxes/{_quote(sandbox_id)}/files", params={"path": path}, content=data,
                      timeout=self._budget(sandbox_id))

    def get(self, sandbox_id: str, path: str) -> bytes:
        """Read a file inside the sandbox."""
        return self._request("GET", f"/sandboxes/{_quote(sandbox_id)}/files", params={"path": path},
                             timeout=self._budget(sandbox_id)).content

    # -- internals ---------------------------------------------------------------------------
    def _budget(self, sandbox_id: str, timeout_s: float | None = None) -> float:
        if timeout_s is None:
            with self._lock:
                timeout_s = self._exec_timeouts.get(sandbox_id, DEFAULT_EXEC_TIMEOUT_S)
        return timeout_s + self.margin_s

    def _request(self, method: str, path: str, *, timeout: float | None = None, **kwargs) -> httpx.Response:
        where = f"sandbox server {self.url}: {method} {path}"
        try:
            response = self._http.request(method, path, timeout=self.timeout_s if timeout is None else timeout,
                                          **kwargs)
        except httpx.TimeoutException as err:
            raise SandboxError(f"{where}: no answer in time ({type(err).__name__})", Status.INFRA_ERROR) from err
        except httpx.HTTPError as err:
            raise SandboxError(f"{where}: {type(err).__name__}: {err}", Status.INFRA_ERROR) from err
        if response.is_success:
            return response
        reason = _reason(response)
        # 429: the server is at a cap (sandboxes, running commands); like a 5xx, worth retrying later
        if response.status_code >= 500 or response.status_code == 429:
            raise SandboxError(f"{where}: {response.status_code} {reason}", Status.INFRA_ERROR)
        raise SandboxError(reason, Status.ERROR)


def _quote(sandbox_id: str) -> str:
    return quote(sandbox_id, safe="")


def _reason(response: httpx.Response) -> str:
    """The server's `detail`, or the start of whatever else answered (a proxy's error page)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else (response.text[:200] or response.reason_phrase)
