"""Run the sandbox server (rollmill.sandbox.server's app): in a daemon thread of this process
(`ServerThread`: tests, embedding), or as the process itself (`serve`, `rollmill sandbox serve`).

Either way a shutdown kills every running command before uvicorn's graceful wait, which would otherwise
last until each exec in flight ends, and destroys the sandboxes created through the server.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from typing import Callable

import uvicorn
from fastapi import FastAPI

from rollmill.sandbox import make_backend
from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.limits import Limits
from rollmill.sandbox.server import in_own_thread, make_app
from rollmill.sandbox.spec import SandboxError
from rollmill.sandbox.tracker import kill_child_processes

log = logging.getLogger(__name__)
TOKEN_ENV = "ROLLMILL_SANDBOX_TOKEN"
# how long uvicorn waits for requests in flight once every command is dead
SHUTDOWN_GRACE_S = 2


class _Server(uvicorn.Server):
    """uvicorn that runs `before_shutdown` (killing every command) before its graceful wait: that
    wait lasts until each request in flight is answered, which an exec would hold up to its timeout."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], None]):
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets=None) -> None:
        await in_own_thread(self.before_shutdown)
        await super().shutdown(sockets)


class ServerThread:
    """uvicorn serving `app` (from make_app) in a daemon thread; a context manager (tests,
    embedding in a process). Stopping it destroys the sandboxes created through it.

    Port 0 picks a free port; `url` has the real one once started.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0):
        self.host = host
        self.start_timeout_s = start_timeout_s
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._server = _Server(config, app.state.tracker.close)
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


def serve(backend: SandboxBackend, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, *,
          limits: Limits | None = None, allowed_paths: tuple[str, ...] = (), allow_host_network: bool = False,
          allow_no_token: bool = False) -> None:
    """Serve `backend` with uvicorn until SIGINT or SIGTERM (blocking).

    On the signal every sandbox is destroyed and every child process killed before uvicorn waits
    for the requests in flight, so the process exits within seconds.
    """
    if not token and allow_no_token:
        log.warning("serving WITHOUT a token (--insecure-no-token): anyone who reaches %s:%d runs commands "
                    "on this host", host, port)
    log.info("serving %s sandboxes on %s:%d (host paths allowed: %s)", backend.name, host, port,
             list(allowed_paths) or "none")
    app = make_app(backend, token, limits=limits, allowed_paths=allowed_paths,
                   allow_host_network=allow_host_network, allow_no_token=allow_no_token)

    def kill_everything() -> None:
        app.state.tracker.close()
        kill_child_processes()

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    _Server(config, kill_everything).run()


def serve_main(args: argparse.Namespace) -> int:
    """Run `rollmill sandbox serve`; return the exit code."""
    try:
        token = _read_token(args.token_file)
        limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)
                           if getattr(args, f.name, None) is not None})
    except (OSError, ValueError) as err:
        print(f"rollmill sandbox serve: {err}", file=sys.stderr)
        return 2
    if token is None and not (args.insecure_no_token and _is_loopback(args.host)):
        why = "--insecure-no-token is for loopback hosts only" if args.insecure_no_token else \
            "use --token-file or $" + TOKEN_ENV + ", or --insecure-no-token on a loopback host"
        print(f"rollmill sandbox serve: refusing to serve on {args.host!r} without a token ({why})", file=sys.stderr)
        return 2
    try:
        options = {"root": args.root} if args.root else {}
        if args.backend == "bwrap":  # it holds each host path open from an allowed root, symlinks refused
            options["allowed_paths"] = tuple(args.allow_path)
        backend = make_backend(args.backend, **options)
    except SandboxError as err:
        print(f"rollmill sandbox serve: {err}", file=sys.stderr)
        return 1
    # uvicorn re-raises the signal that stopped it; as an exception it lets the sandboxes be destroyed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve(backend, args.host, args.port, token, limits=limits, allowed_paths=tuple(args.allow_path),
              allow_host_network=args.allow_host_network, allow_no_token=args.insecure_no_token)
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
