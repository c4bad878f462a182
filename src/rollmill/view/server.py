"""A read-only local web viewer over run directories: curves from metrics.jsonl, samples from samples.jsonl.

Only two files of each run given on the command line are ever read; requests name a run by its index in
that list, never by a path, so no URL can reach another file on the machine."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

from rollmill.track.metrics import read_jsonl

log = logging.getLogger(__name__)

# Loopback only: the viewer shows prompts and completions, which are not for the network.
HOST = "127.0.0.1"
# The files of a run the API serves, by the name the URL uses.
RUN_FILES = {"metrics": "metrics.jsonl", "samples": "samples.jsonl"}


@dataclass(frozen=True)
class Run:
    """A run directory the viewer was started on, and the name it is shown under."""

    name: str
    path: Path

    def summary(self, index: int) -> dict:
        return {"id": index, "name": self.name, "path": str(self.path),
                "has_metrics": (self.path / RUN_FILES["metrics"]).is_file(),
                "has_samples": (self.path / RUN_FILES["samples"]).is_file()}


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """The runs for `run_dirs`, named by folder; a name two folders share gets its index appended so the
    legend tells them apart. Raises ValueError for a folder with neither metrics.jsonl nor samples.jsonl."""
    runs: list[Run] = []
    for path in run_dirs:
        path = path.resolve()
        if not any((path / name).is_file() for name in RUN_FILES.values()):
            raise ValueError(f"{path} has neither metrics.jsonl nor samples.jsonl (is it a run directory?)")
        names = [r.name for r in runs]
        runs.append(Run(path.name if path.name not in names else f"{path.name} ({len(runs)})", path))
    return runs


def _index_html() -> bytes:
    return files("rollmill.view").joinpath("static/index.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    """GET / (the page), /api/runs, /api/runs/N/metrics, /api/runs/N/samples; everything else is 404."""

    runs: list[Run] = []
    server_version = "rollmill-view"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if not parts:
            return self._send(HTTPStatus.OK, _index_html(), "text/html; charset=utf-8")
        if parts == ["api", "runs"]:
            return self._json([r.summary(i) for i, r in enumerate(self.runs)])
        if len(parts) == 4 and parts[:2] == ["api", "runs"] and parts[2].isdigit() and parts[3] in RUN_FILES:
            index = int(parts[2])
            if index < len(self.runs):
                return self._run_file(self.runs[index], RUN_FILES[parts[3]])
        self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}', "application/json")

    def _run_file(self, run: Run, name: str) -> None:
        try:
            self._json(read_jsonl(run.path / name))
        except (OSError, ValueError) as err:  # a file being rewritten, or a corrupt line: say so, keep serving
            body = json.dumps({"error": f"{name}: {err}"}).encode()
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, body, "application/json")

    def _json(self, data) -> None:
        # NaN/inf (a diverged loss) are sent as null: JSON.parse rejects the bare tokens Python writes
        body = json.dumps(_finite(data), ensure_ascii=False).encode()
        self._send(HTTPStatus.OK, body, "application/json; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a running job keeps appending: reload must show it
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's signature)
        log.debug("%s " + format, self.address_string(), *args)


def _finite(data):
    if isinstance(data, float) and (data != data or data in (float("inf"), float("-inf"))):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def make_server(run_dirs: list[Path], port: int = 8787) -> ThreadingHTTPServer:
    """A server for `run_dirs` bound to 127.0.0.1:`port` (0 = any free port), not yet serving."""
    handler = type("RunViewHandler", (_Handler,), {"runs": load_runs(run_dirs)})
    server = ThreadingHTTPServer((HOST, port), handler)
    server.daemon_threads = True  # an open browser tab must not keep the process alive after Ctrl-C
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    """The address to open in a browser."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve `server` from a daemon thread (tests, notebooks); stop it with server.shutdown()."""
    thread = threading.Thread(target=server.serve_forever, name="rollmill-view", daemon=True)
    thread.start()
    return thread
