"""The sandbox server under abuse: operator ceilings, caps, idle TTLs, /health under load, SIGTERM.

Server logic that needs no isolation runs over the process backend (so it runs everywhere); the
checks about real sandboxes (cgroup limits, execs in bwrap, what SIGTERM leaves) use bwrap.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from rollmill.sandbox.bwrap import BwrapBackend
from rollmill.sandbox.cgroup import CGROUP_ROOT, CONTROLLERS, PARENT, cgroups_available
from rollmill.sandbox.client import RemoteBackend
from rollmill.sandbox.limits import Limits
from rollmill.sandbox.process import ProcessBackend
from rollmill.sandbox.serve import ServerThread, serve_main
from rollmill.sandbox.server import make_app
from rollmill.sandbox.spec import SandboxError, SandboxSpec, Status

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KiB = 1024
ROLLMILL = Path(sys.executable).with_name("rollmill")


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    backend = BwrapBackend(root=tmp_path_factory.mktemp("sb"))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def processes():
    backend = ProcessBackend()
    try:
        yield backend
    finally:
        backend.close()


@contextmanager
def serving(backend, **limits):
    """A server over `backend` with the given ceilings (a fast reaper), and a client of it."""
    app = make_app(backend, TOKEN, limits=Limits(**limits), reap_interval_s=0.05)
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, headers=AUTH, timeout=30) as http:
        yield http


def create(http, **spec) -> str:
    response = http.post("/sandboxes", json={"spec": spec})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_bodies_over_the_ceiling_are_413_before_parsing(processes):
    with serving(processes, max_request_bytes=64 * KiB, max_file_bytes=128 * KiB) as http:
        box = create(http, max_file_bytes=128 * KiB)
        body = json.dumps({"argv": ["cat"], "stdin_b64": base64.b64encode(b"x" * 100_000).decode()}).encode()
        streamed = iter([body[i:i + 8192] for i in range(0, len(body), 8192)])  # no Content-Length
        for method, path, kwargs, limit in [
            ("POST", f"/sandboxes/{box}/exec", {"content": body}, "65536-byte limit (--max-request)"),
            ("POST", f"/sandboxes/{box}/exec", {"content": streamed}, "65536-byte limit (--max-request)"),
            ("POST", "/sandboxes", {"json": {"spec": {"env": {"BIG": "x" * 100_000}}}}, "65536-byte limit"),
            ("PUT", "/sandboxes/not-mine/files?path=f", {"content": b"x" * 200_000}, "131072-byte limit (--max-file)"),
            ("PUT", f"/sandboxes/{box}/files?path=f", {"content": b"x" * 200_000},
             "131072-byte limit (spec.max_file_bytes)"),
        ]:
            response = http.request(method, path, headers={"Content-Type": "application/json"}, **kwargs)
            assert response.status_code == 413, response.text
            assert limit in response.json()["detail"] and response.json()["status"] == "error"
        fits = {"argv": ["cat"], "stdin_b64": base64.b64encode(b"fits").decode()}
        assert http.post(f"/sandboxes/{box}/exec", json=fits).json()["stdout"] == "fits"


def test_exec_over_a_ceiling_is_400_naming_it(processes):
    with serving(processes, max_exec_timeout_s=5, max_output_bytes=64 * KiB) as http:
        box = create(http, exec_timeout_s=5, max_output_bytes=64 * KiB)
        for asked, field, ceiling in [({"timeout_s": 5.5}, "timeout_s", 5), ({"timeout_s": 1e300}, "timeout_s", 5),
                                      ({"max_output_bytes": 64 * KiB + 1}, "max_output_bytes", 64 * KiB)]:
            response = http.post(f"/sandboxes/{box}/exec", json={"argv": ["true"], **asked})
            assert response.status_code == 400, response.text
            assert (response.json()["field"], response.json()["ceiling"]) == (field, ceiling)
            assert f"{field}=" in response.json()["detail"] and "--max-" in response.json()["detail"]
        at_ceiling = http.post(f"/sandboxes/{box}/exec", json={"argv": ["true"], "timeout_s": 5,
                                                               "max_output_bytes": 64 * KiB})
        assert at_ceiling.status_code == 200 and at_ceiling.json()["exit_code"] == 0


@pytest.mark.parametrize("field, value, flag", [
    ("exec_timeout_s", 601.0, "--max-exec-timeout"), ("max_output_bytes", 16 * 1024 * KiB + 1, "--max-output"),
    ("max_file_bytes", 64 * 1024 * KiB + 1, "--max-file"), ("ttl_s", 24 * 3600.0 + 1, "--max-ttl"),
    ("pids", 4097, "--max-pids"), ("memory_bytes", 2 * 1024 ** 3 + 1, "--max-memory"),
    ("disk_bytes", 2 * 1024 ** 3 + 1, "--max-disk"), ("cpus", 1.5, "--max-cpus"),
])
def test_spec_over_an_operator_ceiling_is_400(processes, field, value, flag):
    with serving(processes, max_memory_bytes=2 * 1024 ** 3, max_disk_bytes=2 * 1024 ** 3, max_cpus=1.0) as http:
        response = http.post("/sandboxes", json={"spec": {field: value}})
        assert response.status_code == 400, response.text
        assert response.json()["field"] == f"spec.{field}" and flag in response.json()["detail"]
        assert http.get("/health").json()["sandboxes"] == 0


@pytest.mark.parametrize("field, value, why", [
    ("memory_bytes", 2 ** 50, "host's RAM"), ("disk_bytes", 2 ** 50, "host's RAM"),
    ("pids", 10 ** 9, "pid_max"), ("cpus", 1e6, "host's cpu count"), ("cpus", 0.001, "smallest cpu quota"),
])
def test_impossible_spec_is_the_clients_error(sandboxes, field, value, why):
    before = sandboxes.list()
    # no operator ceilings on host resources: the host's own capacity is what refuses
    with serving(sandboxes, max_pids=None) as http, RemoteBackend(str(http.base_url), token=TOKEN) as remote:
        with pytest.raises(SandboxError, match=f"spec.{field}=") as refused:
            remote.create(SandboxSpec(**{field: value}))
        assert refused.value.status is Status.ERROR and why in str(refused.value)
    assert sandboxes.list() == before


def test_live_sandbox_cap_is_429_with_retry_after(processes):
    with serving(processes, max_sandboxes=2) as http:
        first, _ = create(http), create(http)
        full = http.post("/sandboxes", json={})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        assert full.json()["status"] == "infra_error" and "--max-sandboxes" in full.json()["detail"]
        assert http.post("/sandboxes", json={"id": first}).status_code == 201  # idempotent: no new room
        with RemoteBackend(str(http.base_url), token=TOKEN) as remote, \
                pytest.raises(SandboxError, match="429") as busy:
            remote.create(SandboxSpec())
        assert busy.value.status is Status.INFRA_ERROR
        assert http.delete(f"/sandboxes/{first}").status_code == 204
        create(http)


def test_idle_sandboxes_are_reaped_after_their_ttl(processes):
    with serving(processes) as http:
        idle, used = create(http, ttl_s=0.5), create(http, ttl_s=0.5)
        # an exec longer than the TTL keeps its sandbox, and so does use more often than the TTL
        assert http.post(f"/sandboxes/{used}/exec", json={"argv": ["sleep", "0.8"]}).json()["exit_code"] == 0
        for _ in range(6):
            assert http.get(f"/sandboxes/{used}/stats").status_code == 200
            time.sleep(0.1)
        assert idle not in processes.list() and used in processes.list()
        for method, path in [("POST", "exec"), ("GET", "stats"), ("POST", "reset"), ("GET", "files?path=f")]:
            response = http.request(method, f"/sandboxes/{idle}/{path}", json={"argv": ["true"]})
            assert response.status_code == 404 and "expired" in response.json()["detail"], (path, response.text)
        assert http.delete(f"/sandboxes/{idle}").status_code == 204
        assert http.post("/sandboxes", json={"id": idle}).status_code == 201
        assert http.post(f"/sandboxes/{idle}/exec", json={"argv": ["true"]}).status_code == 200


def _health_latency(url: str) -> float:
    started = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=1.0).json()["status"] == "ok"
    return time.monotonic() - started


def test_exec_cap_is_429_while_health_stays_fast(sandboxes):
    with serving(sandboxes, max_concurrent_execs=2) as http:
        url, box = str(http.base_url), create(http)
        codes = []
        sleepers = [threading.Thread(target=lambda: codes.append(httpx.post(
            f"{url}/sandboxes/{box}/exec", json={"argv": ["sleep", "2.5"]}, headers=AUTH, timeout=30).status_code))
            for _ in range(2)]
        for t in sleepers:
            t.start()
        deadline = time.monotonic() + 5
        while http.get("/health").json()["execs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        over = http.post(f"/sandboxes/{box}/exec", json={"argv": ["true"]})
        assert over.status_code == 429 and over.headers["Retry-After"] == "1", over.text
        assert "--max-concurrent-execs" in over.json()["detail"] and over.json()["status"] == "infra_error"
        latencies = [_health_latency(url) for _ in range(5)]
        assert http.get("/sandboxes").status_code == 200  # FastAPI's threadpool is not starved either
        for t in sleepers:
            t.join()
        assert codes == [200, 200]
        assert max(latencies) < 1.0
        print(f"/health latency with every exec slot busy: max {max(latencies) * 1000:.1f} ms")


class _SlowList:
    """A backend whose `list` blocks, to fill FastAPI's threadpool (40 threads)."""

    name = "slow"

    def __init__(self):
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def list(self):
        with self._lock:
            self.waiting += 1
        self.release.wait(20)
        return []


def test_health_needs_no_thread():
    backend = _SlowList()
    with ServerThread(make_app(backend, TOKEN)) as thread, \
            httpx.Client(base_url=thread.url, headers=AUTH, timeout=30,
                         limits=httpx.Limits(max_connections=60)) as http:
        waiting = [threading.Thread(target=http.get, args=("/sandboxes",)) for _ in range(50)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while backend.waiting < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            assert backend.waiting == 40  # every thread of the pool is taken, 10 more requests queue
            latency = _health_latency(thread.url)
        finally:
            backend.release.set()
            for t in waiting:
                t.join()
        assert latency < 1.0
        print(f"/health latency with FastAPI's threadpool full: {latency * 1000:.1f} ms")


def serve_args(*argv):
    from rollmill.cli import build_parser

    return build_parser().parse_args(["sandbox", "serve", "--backend", "process", *argv])


def test_serving_without_a_token_needs_the_explicit_flag(monkeypatch, capsys, processes):
    import rollmill.sandbox.serve as server

    monkeypatch.delenv("ROLLMILL_SANDBOX_TOKEN", raising=False)
    served = []
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: served.append(kwargs))
    # serve_main installs a SIGTERM handler: give pytest its own back
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert serve_main(serve_args()) == 2
    assert "--insecure-no-token" in capsys.readouterr().err and not served
    assert serve_main(serve_args("--insecure-no-token", "--host", "0.0.0.0")) == 2
    assert "loopback" in capsys.readouterr().err and not served
    assert serve_main(serve_args("--insecure-no-token")) == 0
    assert served[0]["allow_no_token"] is True
    with pytest.raises(ValueError, match="allow_no_token"):
        make_app(processes, None)
    assert serve_main(serve_args("--max-memory", "0")) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftover_processes(marker: str, root: Path) -> list[str]:
    """Processes running our marked command or a bwrap over `root`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text or str(root) in text:
            found.append(f"{cmdline.parent.name}: {text}")
    return found


def _leftover_cgroups(root: Path) -> list[str]:
    if not cgroups_available():
        return []
    prefix = BwrapBackend(root=root, sweep=False).cgroup_prefix
    return [str(d) for c in CONTROLLERS if (CGROUP_ROOT / c / PARENT).is_dir()
            for d in (CGROUP_ROOT / c / PARENT).iterdir() if d.name.startswith(prefix)]


@pytest.mark.parametrize("kind", ["bwrap", "process"])
def test_sigterm_stops_serve_with_execs_in_flight(kind, tmp_path):
    if kind == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    root, port, log = tmp_path / "state", _free_port(), tmp_path / "serve.log"
    (tmp_path / "token").write_text(TOKEN)
    auth = ["--token-file", str(tmp_path / "token")] if kind == "bwrap" else ["--insecure-no-token"]
    with open(log, "w") as out:
        proc = subprocess.Popen([str(ROLLMILL), "sandbox", "serve", "--backend", kind, "--root", str(root),
                                 "--port", str(port), *auth], stdout=out, stderr=subprocess.STDOUT)
    url, marker = f"http://127.0.0.1:{port}", f"60.{os.getpid()}{port}"
    http = httpx.Client(base_url=url, headers=AUTH, timeout=30)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                http.get("/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        boxes = [create(http) for _ in range(2)]
        answers = []
        execs = [threading.Thread(target=lambda box=box: answers.append(_exec_until_killed(url, box, marker)))
                 for box in boxes + boxes[:1]]
        for t in execs:
            t.start()
        while http.get("/health").json()["execs"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(marker in p for p in _leftover_processes(marker, root)), "the execs never started"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        stopped_s = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
        http.close()
    for t in execs:
        t.join(timeout=5)
    print(f"{kind}: SIGTERM to exit {stopped_s:.2f} s; exec answers {answers}")
    assert code == 0 and stopped_s < 5.0, log.read_text()
    assert len(answers) == 3 and all(a in (503, "disconnected") for a in answers), answers
    assert _leftover_processes(marker, root) == []
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in line]
    assert list(root.iterdir()) == [] and _leftover_cgroups(root) == []
    if kind == "process":
        assert "WITHOUT a token" in log.read_text()


def _exec_until_killed(url: str, box: str, marker: str):
    try:
        return httpx.post(f"{url}/sandboxes/{box}/exec", json={"argv": ["sleep", marker], "timeout_s": 120},
                          headers=AUTH, timeout=30).status_code
    except httpx.TransportError:
        return "disconnected"
