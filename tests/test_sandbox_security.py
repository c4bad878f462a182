"""The security suite: each test is one escape or exhaustion attempt run inside a bubblewrap
sandbox, and each must fail safely with the host unaffected.

Network attempts only ever target this machine: a server on the host's loopback, and a test host
in a network namespace this test creates (TEST-NET-2 addresses on a veth pair that leads nowhere
else; the fixture refuses to run if the host already uses that range).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from rollmill.sandbox.spec import MiB, SandboxSpec, Status

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture
def backend(tmp_path):
    from rollmill.sandbox.bwrap import BwrapBackend

    b = BwrapBackend(root=tmp_path / "sandboxes")
    yield b
    b.close()


@pytest.fixture
def sandbox(backend, tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "task.txt").write_text("task file\n")
    spec = SandboxSpec(workspace=str(workspace), memory_bytes=128 * MiB, pids=64, cpus=0.5,
                       disk_bytes=16 * MiB, exec_timeout_s=20)
    return backend, backend.create(spec), workspace


def run(sandbox, script: str, **kwargs):
    backend, sid, _ = sandbox
    return backend.exec(sid, script=script, **kwargs)


def processes_matching(marker: str) -> list[int]:
    """Host pids whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# -- network ----------------------------------------------------------------------------------
def test_only_loopback_exists_inside(sandbox):
    result = run(sandbox, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert result.ok and result.stdout.split() == ["lo"]


def test_host_loopback_server_is_unreachable_but_own_loopback_works(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    connected = []
    threading.Thread(target=lambda: connected.append(server.accept()), daemon=True).start()
    probe = (f"import socket\ns=socket.socket(); s.settimeout(2)\n"
             f"try:\n    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
             f"except OSError as e:\n    print('refused', e)\n")
    result = run(sandbox, f"python3 -c \"{probe}\"")
    server.close()
    assert result.status is Status.OK and "refused" in result.stdout and not connected
    own = run(sandbox, "python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 & sleep 0.5; "
                       "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\"")
    assert own.stdout.strip() == "200"


def sh(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True)


@pytest.fixture
def netns_host():
    """A web server at 198.51.100.2 (TEST-NET-2) in a network namespace of our own, reachable from
    the host through a veth pair; everything is removed afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs iproute2 and root to build a test network namespace")
    in_use = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    if "198.51.100." in in_use:
        pytest.skip("the host already has a TEST-NET-2 address; not touching its network")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"rmtest-{tag}", f"rmh{tag}", f"rmn{tag}"
    sh(f"ip netns add {ns}")
    server = None
    try:
        sh(f"ip link add {host_if} type veth peer name {ns_if}")
        sh(f"ip link set {ns_if} netns {ns}")
        sh(f"ip addr add 198.51.100.1/30 dev {host_if} && ip link set {host_if} up")
        sh(f"ip netns exec {ns} ip addr add 198.51.100.2/30 dev {ns_if}")
        sh(f"ip netns exec {ns} ip link set {ns_if} up && ip netns exec {ns} ip link set lo up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/bin/python3", "-m", "http.server", "8000",
                                   "--bind", "198.51.100.2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield "198.51.100.2", 8000
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(f"ip link del {host_if}", shell=True, capture_output=True)
        subprocess.run(f"ip netns del {ns}", shell=True, capture_output=True)


def test_test_host_in_own_network_namespace_is_unreachable(sandbox, netns_host):
    for _ in range(50):  # positive control: the host itself reaches the test host
        try:
            socket.create_connection(netns_host, timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("the test host never came up")
    probe = (f"import socket\ntry:\n    socket.create_connection({netns_host!r}, timeout=2); print('REACHED')\n"
             f"except OSError as e:\n    print('blocked', e)\n")
    result = run(sandbox, f"python3 -c \"{probe}\"")
    assert result.status is Status.OK and "blocked" in result.stdout and "REACHED" not in result.stdout


# -- filesystem -------------------------------------------------------------------------------
def test_writes_outside_the_workspace_fail_and_the_host_is_unchanged(sandbox, tmp_path):
    before = Path("/etc/hostname").read_bytes(), socket.gethostname()
    result = run(sandbox, "for p in /usr/rm_escape /etc/hostname /rm_escape /bin/rm_escape /proc/sys/kernel/hostname; do "
                          "  (echo pwned > $p) 2>/dev/null && echo WROTE $p; done; echo done")
    assert result.stdout.strip() == "done"
    assert (Path("/etc/hostname").read_bytes(), socket.gethostname()) == before
    assert not Path("/usr/rm_escape").exists() and not Path("/rm_escape").exists()


def test_workspace_writes_are_copy_on_write(sandbox):
    backend, sid, workspace = sandbox
    assert run(sandbox, "echo changed > task.txt && rm -f task.txt && touch new.txt").ok
    assert (workspace / "task.txt").read_text() == "task file\n" and not (workspace / "new.txt").exists()


def test_host_canary_file_is_unreadable(sandbox, tmp_path):
    canary = tmp_path / "canary-secret.txt"
    canary.write_text("CANARY-7f3a9\n")
    result = run(sandbox, f"cat {canary}; cat /proc/1/root{canary}; ls /root /work /home 2>&1; echo end")
    assert "CANARY-7f3a9" not in result.stdout + result.stderr


def test_host_environment_secrets_are_not_inherited(sandbox, monkeypatch):
    monkeypatch.setenv("ROLLMILL_TEST_SECRET", "hunter2-secret")
    result = run(sandbox, "env; cat /proc/1/environ | tr '\\0' '\\n'")
    assert "hunter2-secret" not in result.stdout and "ROLLMILL_TEST_SECRET" not in result.stdout
    assert "PATH=" in result.stdout


def test_symlink_escape_from_the_workspace_fails(sandbox, tmp_path):
    backend, sid, workspace = sandbox
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("OUTSIDE-SECRET")
    assert run(sandbox, f"ln -s {outside}/secret.txt link && ln -s {outside} dirlink && ln -s /etc/hostname hn").ok
    with pytest.raises(Exception):
        backend.get(sid, "link")
    with pytest.raises(Exception):
        backend.put(sid, "dirlink/planted.txt", b"x")
    with pytest.raises(Exception):
        backend.put(sid, "hn", b"pwned")
    backend.reset(sid)
    backend.destroy(sid)
    assert (outside / "secret.txt").read_text() == "OUTSIDE-SECRET" and not (outside / "planted.txt").exists()
    assert Path("/etc/hostname").read_text() != "pwned"


def test_no_capabilities_and_no_new_privileges(sandbox):
    result = run(sandbox, "grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in result.stdout.strip().splitlines())
    assert fields == {"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "NoNewPrivs": "1"}


# -- resources --------------------------------------------------------------------------------
def test_fork_bomb_stops_at_the_pids_limit(sandbox):
    result = run(sandbox, "bomb() { bomb | bomb & }; bomb; sleep 1; echo survived", timeout_s=10)
    assert result.status in (Status.OK, Status.TIMEOUT)
    assert "Resource temporarily unavailable" in result.stderr or result.status is Status.TIMEOUT
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    backend, sid, _ = sandbox
    deadline = time.monotonic() + 5  # the namespace's processes die asynchronously after its init
    while backend.stats(sid).pids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.stats(sid).pids == 0


def test_memory_bomb_is_killed_with_status_oom(sandbox):
    result = run(sandbox, "python3 -c 'b = bytearray(512 * 2**20); print(len(b))'")
    assert result.status is Status.OOM and result.exit_code in (137, -9)


def test_cpu_spin_is_throttled_to_the_quota(sandbox):
    backend, sid, _ = sandbox
    start = backend.stats(sid).cpu_seconds
    result = run(sandbox, "for i in 1 2 3 4; do timeout 2 sh -c 'while :; do :; done' & done; wait")
    used = backend.stats(sid).cpu_seconds - start
    assert result.status is Status.OK
    assert used < 0.5 * 2 * 1.5, f"4 spinners for 2 s used {used:.2f} cpu-s against a 0.5-cpu quota"


def test_wall_clock_limit_returns_timeout(sandbox):
    started = time.monotonic()
    result = run(sandbox, "sleep 30", timeout_s=2)
    assert result.status is Status.TIMEOUT and result.limit == "exec_timeout"
    assert time.monotonic() - started < 5


def test_setsid_daemon_does_not_survive(sandbox):
    backend, sid, _ = sandbox
    marker = f"31{uuid.uuid4().int % 10**6:06d}"
    result = run(sandbox, f"setsid nohup sleep {marker} >/dev/null 2>&1 & disown; echo started")
    assert result.ok and result.stdout.strip() == "started"
    deadline = time.monotonic() + 3
    while processes_matching(f"sleep\0{marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_matching(f"sleep\0{marker}") == []
    backend.destroy(sid)
    assert processes_matching(f"sleep\0{marker}") == []


def test_disk_writes_past_the_cap_fail(sandbox):
    result = run(sandbox, "dd if=/dev/zero of=big bs=1M count=64 2>&1; ls -l big | awk '{print $5}'")
    written = int(result.stdout.strip().splitlines()[-1])
    assert "No space left" in result.stdout and written <= 16 * MiB


def test_huge_output_is_truncated_head_and_tail(sandbox):
    result = run(sandbox, "echo FIRST; head -c 100000000 /dev/zero | tr '\\0' 'x'; echo; echo LAST",
                 max_output_bytes=64 * 1024)
    assert result.status is Status.OK and result.truncated
    assert result.output_bytes > 100_000_000
    assert result.stdout.startswith("FIRST") and result.stdout.rstrip().endswith("LAST")
    assert len(result.stdout) < 70 * 1024
