"""The sandbox HTTP server and RemoteBackend, over a real BwrapBackend on a local port."""

import argparse
import shutil
import threading
import time

import httpx
import pytest

from rollmill.sandbox.bwrap import BwrapBackend
from rollmill.sandbox.client import RemoteBackend
from rollmill.sandbox.serve import ServerThread, serve_main
from rollmill.sandbox.server import make_app
from rollmill.sandbox.spec import ExecResult, Mount, SandboxError, SandboxSpec, Status

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    backend = BwrapBackend(root=tmp_path_factory.mktemp("sb"))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def server(local):
    with ServerThread(make_app(local, TOKEN)) as thread:
        yield thread


@pytest.fixture
def remote(server):
    backend = RemoteBackend(server.url, token=TOKEN, margin_s=10.0)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30.0) as client:
        yield client


@pytest.fixture
def box(remote):
    sandbox_id = remote.create(SandboxSpec(max_file_bytes=1024, exec_timeout_s=10.0))
    try:
        yield sandbox_id
    finally:
        remote.destroy(sandbox_id)


def check_backend_protocol(backend) -> None:
    """What every SandboxBackend must do, local or remote."""
    sandbox_id = "protocol-check"
    assert backend.create(SandboxSpec(env={"GREETING": "hi"}), sandbox_id) == sandbox_id
    try:
        assert backend.create(SandboxSpec(), sandbox_id) == sandbox_id
        assert sandbox_id in backend.list()
        run = backend.exec(sandbox_id, ["sh", "-c", 'echo "$GREETING $EXTRA"; echo oops >&2; exit 3'],
                           env={"EXTRA": "there"})
        assert (run.status, run.exit_code, run.stdout, run.stderr) == (Status.OK, 3, "hi there\n", "oops\n")
        assert backend.exec(sandbox_id, script="cat | tr a-z A-Z", stdin=b"piped").stdout == "PIPED"
        backend.put(sandbox_id, "/workspace/sub/data.bin", bytes(range(256)))
        assert backend.get(sandbox_id, "/workspace/sub/data.bin") == bytes(range(256))
        assert backend.exec(sandbox_id, ["pwd"], cwd="/workspace/sub").stdout == "/workspace/sub\n"
        noisy = backend.exec(sandbox_id, script="head -c 100000 /dev/zero | tr '\\0' x", max_output_bytes=1000)
        assert noisy.truncated and noisy.output_bytes == 100000 and len(noisy.stdout) < 1100
        assert backend.stats(sandbox_id).execs >= 5
        backend.reset(sandbox_id)
        with pytest.raises(SandboxError) as missing:
            backend.get(sandbox_id, "/workspace/sub/data.bin")
        assert missing.value.status is Status.ERROR
        with pytest.raises(SandboxError, match="exactly one of argv or script") as both:
            backend.exec(sandbox_id, ["true"], script="true")
        assert both.value.status is Status.ERROR
    finally:
        backend.destroy(sandbox_id)
    backend.destroy(sandbox_id)
    assert sandbox_id not in backend.list()
    for call in (lambda: backend.exec("no-such-box", ["true"]), lambda: backend.stats("no-such-box"),
                 lambda: backend.put("no-such-box", "x", b""), lambda: backend.reset("no-such-box")):
        with pytest.raises(SandboxError, match="unknown sandbox") as unknown:
            call()
        assert unknown.value.status is Status.ERROR
    assert backend.sweep() == 0


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_backend_protocol(kind, request):
    check_backend_protocol(request.getfixturevalue(kind))


def test_round_trip(remote, box, local):
    assert remote.name == "remote" and box in remote.list() and box in local.list()
    remote.put(box, "/workspace/hello.py", b"print('hello from', __name__)\n")
    run = remote.exec(box, ["python3", "hello.py"])
    assert isinstance(run, ExecResult) and run.ok and run.stdout == "hello from __main__\n"
    remote.exec(box, script="echo written > /workspace/out.txt")
    assert remote.get(box, "out.txt") == b"written\n"
    stats = remote.stats(box)
    assert stats.execs >= 3 and stats.age_s > 0
    remote.reset(box)
    assert remote.exec(box, ["ls", "-A", "/workspace"]).stdout == ""
    remote.destroy(box)
    assert box not in local.list()
    remote.destroy(box)


def test_timeout_over_http(remote, box):
    started = time.monotonic()
    run = remote.exec(box, ["sleep", "30"], timeout_s=0.5)
    assert (run.status, run.limit) == (Status.TIMEOUT, "exec_timeout")
    assert time.monotonic() - started < 10


def test_concurrent_execs_do_not_block_each_other(remote, box):
    results = []
    threads = [threading.Thread(target=lambda: results.append(remote.exec(box, ["sleep", "1"])))
               for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r.ok for r in results)
    assert time.monotonic() - started < 3.5


def test_auth(server):
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/sandboxes").status_code == 401
        assert anonymous.get("/sandboxes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.post("/sandboxes", content=b"not json").status_code == 401
        assert anonymous.get("/sandboxes", headers=AUTH).status_code == 200
        health = anonymous.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["backend"] == "bwrap"
    with pytest.raises(SandboxError, match="bearer token") as denied:
        RemoteBackend(server.url, token="wrong").list()
    assert denied.value.status is Status.ERROR


@pytest.mark.parametrize("method, path, kwargs, code, reason", [
    ("POST", "/sandboxes/no-such-box/exec", {"json": {"argv": ["true"]}}, 404, "unknown sandbox"),
    ("GET", "/sandboxes/no-such-box/stats", {}, 404, "unknown sandbox"),
    ("POST", "/sandboxes/bad%20id/reset", {}, 422, "sandbox_id"),
    ("POST", "/sandboxes", {"json": {"spec": {"memory_bytes": -1}}}, 422, "spec.memory_bytes"),
    ("POST", "/sandboxes", {"json": {"spec": {"no_such_field": 1}}}, 422, "spec.no_such_field"),
    ("POST", "/sandboxes", {"json": {"id": "../escape"}}, 422, "id"),
    ("POST", "/sandboxes", {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
     400, "not valid JSON"),
    ("POST", "/sandboxes/{box}/exec", {"json": {"argv": ["true"], "script": "true"}}, 400, "exactly one"),
    ("POST", "/sandboxes/{box}/exec", {"json": {}}, 400, "exactly one"),
    ("POST", "/sandboxes/{box}/exec", {"json": {"argv": ["true"], "timeout_s": -1}}, 422, "timeout_s"),
    ("POST", "/sandboxes/{box}/exec", {"json": {"argv": ["cat"], "stdin_b64": "%%"}}, 422, "stdin_b64"),
    ("POST", "/sandboxes/{box}/exec", {"json": {"argv": ["echo", "a\x00b"]}}, 422, "argv.1"),
    ("GET", "/sandboxes/{box}/files?path=a%00b", {}, 422, "path"),
    ("PUT", "/sandboxes/{box}/files?path=big", {"content": b"x" * 2048}, 413, "1024-byte limit"),
    ("PUT", "/sandboxes/{box}/files?path=big", {"content": iter([b"x" * 600] * 2)}, 413, "1024-byte limit"),
    ("GET", "/sandboxes/{box}/files?path=missing", {}, 400, "no such file"),
    ("GET", "/sandboxes/{box}/files", {}, 422, "path"),
])
def test_bad_requests_get_a_reason(http, box, method, path, kwargs, code, reason):
    response = http.request(method, path.format(box=box), **kwargs)
    assert response.status_code == code, response.text
    assert reason in response.json()["detail"]
    assert http.post(f"/sandboxes/{box}/exec", json={"argv": ["echo", "alive"]}).json()["stdout"] == "alive\n"


def test_remote_maps_errors(remote, box):
    with pytest.raises(SandboxError, match="1024-byte limit") as too_big:
        remote.put(box, "big", b"x" * 2048)
    assert too_big.value.status is Status.ERROR
    with pytest.raises(SandboxError, match="memory_bytes"):
        remote.create(SandboxSpec.model_construct(**{**SandboxSpec().model_dump(), "memory_bytes": -1}))
    remote.destroy("never-created")


def test_server_failures_are_infra_errors():
    with ServerThread(make_app(_Stub(), None, allow_no_token=True)) as thread:
        url = thread.url
        failing = RemoteBackend(url, timeout_s=5.0)
        assert failing.sweep() == 3
        with pytest.raises(SandboxError, match="RuntimeError: backend bug") as crash:
            failing.list()
        assert crash.value.status is Status.INFRA_ERROR
        with pytest.raises(SandboxError, match="503 disk gone") as down:
            failing.create(SandboxSpec())
        assert down.value.status is Status.INFRA_ERROR and url in str(down.value)
        assert httpx.get(f"{url}/sandboxes/x/stats").status_code == 500
        failing.close()
    gone = RemoteBackend(url, timeout_s=2.0)
    with pytest.raises(SandboxError, match="ConnectError") as refused:
        gone.list()
    assert refused.value.status is Status.INFRA_ERROR and url in str(refused.value)
    gone.close()


class _Stub:
    """A backend that fails, to see the server's 500 and 503 answers (and a harmless sweep)."""

    name = "stub"

    def sweep(self):
        return 3

    def list(self):
        raise RuntimeError("backend bug")

    def stats(self, sandbox_id):
        raise KeyError(sandbox_id)

    def create(self, spec, sandbox_id=None):
        raise SandboxError("disk gone", Status.INFRA_ERROR)


def serve_args(*argv) -> argparse.Namespace:
    from rollmill.cli import build_parser

    return build_parser().parse_args(["sandbox", "serve", *argv])


def test_serve_refuses_open_host_without_token(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("ROLLMILL_SANDBOX_TOKEN", raising=False)
    assert serve_main(serve_args("--host", "0.0.0.0")) == 2
    assert "without a token" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert serve_main(serve_args("--host", "0.0.0.0", "--token-file", str(tmp_path / "empty"))) == 2
    assert serve_main(serve_args("--token-file", str(tmp_path / "missing"))) == 2


def test_server_accepts_host_paths_only_under_allowed_paths(local, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "ws").mkdir(parents=True)
    (allowed / "ws" / "f.txt").write_text("inside\n")
    with ServerThread(make_app(local, TOKEN, allowed_paths=(str(allowed),))) as thread:
        with RemoteBackend(thread.url, token=TOKEN) as remote:
            sid = remote.create(SandboxSpec(workspace=str(allowed / "ws")))
            assert remote.exec(sid, ["cat", "f.txt"]).stdout == "inside\n"
            for spec in (SandboxSpec(workspace="/"), SandboxSpec(workspace=str(allowed / "ws" / ".." / "..")),
                         SandboxSpec(mounts=[Mount(source="/etc", target="/host-etc")]), SandboxSpec(network="host")):
                with pytest.raises(SandboxError, match="allowed") as err:
                    remote.create(spec)
                assert err.value.status is Status.ERROR
