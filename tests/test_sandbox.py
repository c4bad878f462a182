"""The sandbox backends, the pool and `rollmill sandbox run`: behaviour, statuses, hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil
import threading
import time
from pathlib import Path

import pytest

from rollmill.sandbox import SandboxError, SandboxSpec, Status, make_backend
from rollmill.sandbox.cgroup import leftover_cgroups
from rollmill.sandbox.mounts import mounts_under
from rollmill.sandbox.pool import SandboxPool

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "a.txt").write_text("alpha\n")
    (ws / "sub" / "b.txt").write_text("beta\n")
    return ws


@pytest.fixture(params=[pytest.param("bwrap", marks=needs_bwrap), "process"])
def backend(request, tmp_path):
    b = make_backend(request.param, root=tmp_path / "sandboxes")
    yield b
    b.close()


def test_backend_round_trip(backend, workspace):
    sid = backend.create(SandboxSpec(workspace=str(workspace)))
    assert backend.create(SandboxSpec(workspace=str(workspace)), sid) == sid  # idempotent on the id
    assert backend.list() == [sid]
    result = backend.exec(sid, ["cat", "a.txt", "sub/b.txt"])
    assert result.ok and result.stdout == "alpha\nbeta\n" and result.status is Status.OK
    failed = backend.exec(sid, script="echo oops >&2; exit 3")
    assert failed.status is Status.OK and failed.exit_code == 3 and failed.stderr == "oops\n" and not failed.ok
    backend.put(sid, "new/dir/c.bin", b"\x00\xffdata")
    assert backend.get(sid, "new/dir/c.bin") == b"\x00\xffdata"
    assert backend.exec(sid, ["cat", "new/dir/c.bin"]).stdout.endswith("data")
    piped = backend.exec(sid, ["wc", "-c"], stdin=b"12345")
    assert piped.stdout.strip() == "5"
    env = backend.exec(sid, script="echo $GREETING", env={"GREETING": "hi"})
    assert env.stdout == "hi\n"
    assert backend.exec(sid, ["pwd"], cwd=None).ok
    backend.exec(sid, script="echo changed > a.txt; rm sub/b.txt")
    backend.reset(sid)
    assert backend.exec(sid, ["cat", "a.txt", "sub/b.txt"]).stdout == "alpha\nbeta\n"
    assert backend.exec(sid, ["ls", "new"]).exit_code != 0
    assert (workspace / "a.txt").read_text() == "alpha\n"  # the source never changes
    assert backend.stats(sid).execs >= 8
    backend.destroy(sid)
    backend.destroy(sid)
    assert backend.list() == []


def test_backend_errors_are_typed(backend, workspace):
    with pytest.raises(SandboxError, match="unknown sandbox") as err:
        backend.exec("sb-nope", ["true"])
    assert err.value.status is Status.ERROR
    sid = backend.create(SandboxSpec(workspace=str(workspace)))
    with pytest.raises(SandboxError, match="exactly one of argv or script"):
        backend.exec(sid, ["true"], script="true")
    with pytest.raises(SandboxError, match="no such file"):
        backend.get(sid, "missing.txt")
    timed = backend.exec(sid, ["sleep", "5"], timeout_s=0.5)
    assert timed.status is Status.TIMEOUT and timed.limit == "exec_timeout" and timed.duration_s < 3


@needs_bwrap
def test_bwrap_rejects_bad_ids_and_missing_workspace(tmp_path):
    backend = make_backend("bwrap", root=tmp_path / "sb")
    with pytest.raises(SandboxError, match="bad sandbox id"):
        backend.create(SandboxSpec(), "../escape")
    with pytest.raises(SandboxError, match="does not exist"):
        backend.create(SandboxSpec(workspace=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SandboxError, match="is not a directory"):
        backend.create(SandboxSpec(workspace=str(tmp_path / "file")))
    with pytest.raises(SandboxError, match="max_file_bytes"):
        sid = backend.create(SandboxSpec(max_file_bytes=10))
        backend.put(sid, "f", b"x" * 11)
    backend.close()


@needs_bwrap
def test_sweep_removes_leftovers_of_a_dead_owner_only(tmp_path):
    root = tmp_path / "sb"
    crashed = make_backend("bwrap", root=root)
    dead = crashed.create(SandboxSpec())
    alive_backend = make_backend("bwrap", root=root)
    alive = alive_backend.create(SandboxSpec())
    owner = root / f"{dead}.owner"
    owner.write_text(json.dumps({"pid": 2**22 + 1, "boot": "0"}))  # as if its process had died
    fresh = make_backend("bwrap", root=root)  # sweeps at start
    assert not (root / dead).exists() and not owner.exists()
    assert fresh.cgroup_prefix + dead not in leftover_cgroups()
    assert alive_backend.cgroup_prefix + alive in leftover_cgroups()
    assert (root / alive).exists() and alive_backend.exec(alive, ["true"]).ok
    alive_backend.close()
    fresh.close()


def test_pool_limits_concurrency_and_reuses_warm_sandboxes(tmp_path):
    backend = make_backend("process", root=tmp_path / "sb")
    spec = SandboxSpec()
    with SandboxPool(backend, max_sandboxes=2, warm=1, warm_spec=spec) as pool:
        warm_id = backend.list()[0]
        first = pool.lease()
        assert first.id == warm_id
        first.put("x.txt", b"dirty")
        second = pool.lease(SandboxSpec(exec_timeout_s=5))
        with pytest.raises(SandboxError, match="pool full") as err:
            pool.lease(SandboxSpec(exec_timeout_s=5), wait_s=0.2)
        assert err.value.status is Status.INFRA_ERROR
        released = threading.Timer(0.2, second.release)
        released.start()
        third = pool.lease(SandboxSpec(exec_timeout_s=5), wait_s=5)  # gets the freed slot
        assert pool.live() == 2
        first.release()
        again = pool.lease()
        assert again.id == warm_id and again.exec(["ls"]).stdout == ""  # reset on return
        with pytest.raises(SandboxError, match="expired or was released"):
            first.exec(["true"])
        third.release()
        again.release()
    assert backend.list() == []


def test_pool_reaper_destroys_expired_leases(tmp_path):
    backend = make_backend("process", root=tmp_path / "sb")
    with SandboxPool(backend, max_sandboxes=2, reap_interval_s=0.05) as pool:
        lease = pool.lease(ttl_s=0.1)
        deadline = time.monotonic() + 5
        while backend.list() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.list() == [] and pool.reaped == 1
        with pytest.raises(SandboxError, match="expired"):
            lease.exec(["true"])


def test_process_backend_says_it_is_not_isolated(tmp_path, caplog):
    make_backend("process", root=tmp_path / "sb")
    assert "NO isolation" in caplog.text


@needs_bwrap
def test_sandbox_run_cli(tmp_path, workspace, capsys):
    from rollmill.cli import main

    assert main(["sandbox", "run", "--workspace", str(workspace), "--", "cat", "a.txt"]) == 0
    out = capsys.readouterr()
    assert out.out == "alpha\n" and "status=ok exit_code=0" in out.err
    assert main(["sandbox", "run", "--timeout", "0.5", "--", "sleep", "5"]) == 3
    assert "status=timeout" in capsys.readouterr().err
    assert main(["sandbox", "run", "--", "sh", "-c", "exit 7"]) == 7
    assert main(["sandbox", "run", "--memory", "lots", "--", "true"]) == 2
    assert "bad size" in capsys.readouterr().err


@needs_bwrap
@pytest.mark.slow
def test_a_thousand_cycles_leave_nothing_behind(tmp_path):
    root = tmp_path / "sb"
    backend = make_backend("bwrap", root=root)
    spec = SandboxSpec(workspace=str(tmp_path), memory_bytes=64 * 2**20, pids=16)
    for i in range(1000):
        sid = backend.create(spec)
        result = backend.exec(sid, script="sleep 60 & setsid sleep 61 & echo $$")
        assert result.ok, result
        backend.destroy(sid)
    assert list(root.iterdir()) == []
    assert mounts_under(root) == [] and not any(str(root) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    assert [name for name in leftover_cgroups() if name.startswith(backend.cgroup_prefix)] == []
    assert all(b"bwrap" not in p.read_bytes() or str(root).encode() not in p.read_bytes()
               for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists())


def test_spec_rejects_nul_bytes_bad_env_names_and_relative_sandbox_paths():
    from pydantic import ValidationError

    for bad in ({"env": {"A": "x\0y"}}, {"env": {"A=B": "x"}}, {"workdir": "workspace"}, {"workspace": "/tmp\0x"}):
        with pytest.raises(ValidationError):
            SandboxSpec(**bad)


def test_process_backend_keeps_files_inside_its_directory(tmp_path):
    backend = make_backend("process", root=tmp_path / "sb")
    sid = backend.create(SandboxSpec())
    (tmp_path / "outside.txt").write_text("host")
    for path in ("../../outside.txt", "/etc/hostname"):
        with pytest.raises(SandboxError, match="only maps paths"):
            backend.get(sid, path)
    with pytest.raises(SandboxError, match="bad sandbox id"):
        backend.destroy("..")
    assert (tmp_path / "sb").is_dir()
    backend.close()


@needs_bwrap
def test_bwrap_user_mistakes_are_errors_not_infra_errors(tmp_path):
    backend = make_backend("bwrap", root=tmp_path / "sb")
    sid = backend.create(SandboxSpec())
    missing_dir = backend.exec(sid, ["true"], cwd="/nowhere")
    missing_cmd = backend.exec(sid, ["no-such-command"])
    assert missing_dir.status is Status.ERROR and "chdir" in missing_dir.message
    assert missing_cmd.status is Status.ERROR and "execvp" in missing_cmd.message
    assert backend.exec(sid, ["true\0"]).status is Status.ERROR
    with pytest.raises(SandboxError, match="bad sandbox id"):
        backend.destroy("..")
    assert (tmp_path / "sb").is_dir()
    backend.close()


def test_docker_containers_are_never_privileged_and_have_no_network(tmp_path):
    from rollmill.sandbox import Mount
    from rollmill.sandbox.docker import run_argv

    spec = SandboxSpec(memory_bytes=2**28, cpus=0.5, pids=32, disk_bytes=2**24, env={"A": "1"},
                       mounts=[Mount(source="/data", target="/data")])
    argv = run_argv("docker", "rollmill-x", spec, tmp_path, "debian:bookworm-slim")
    joined = " ".join(argv)
    assert "--privileged" not in argv and "--network none" in joined and "--cap-drop ALL" in joined
    assert "no-new-privileges" in argv and "--read-only" in argv and "/data:/data:ro" in argv
    assert f"--memory {2**28} --memory-swap {2**28}" in joined and "--pids-limit 32" in joined
    assert "/tmp:size=16777216" in argv and argv[-3:] == ["debian:bookworm-slim", "sleep", "infinity"]


def test_docker_backend_runs_where_a_daemon_exists(tmp_path):
    from rollmill.sandbox.docker import daemon_available

    if not daemon_available():
        pytest.skip("no docker daemon on this machine")
    backend = make_backend("docker", root=tmp_path / "sb")
    sid = backend.create(SandboxSpec())
    try:
        assert backend.exec(sid, ["echo", "hi"]).stdout == "hi\n"
        assert backend.exec(sid, ["sleep", "5"], timeout_s=0.5).status is Status.TIMEOUT
    finally:
        backend.close()


def test_process_backend_leaves_no_temp_directory_behind(tmp_path):
    script = ("import logging, sys; from rollmill.sandbox.process import ProcessBackend; b = ProcessBackend(); "
              "sid = b.create(__import__('rollmill.sandbox.spec', fromlist=['x']).SandboxSpec()); "
              "assert b.exec(sid, ['true']).ok; print(b.root)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    root = Path(out.stdout.strip())
    assert root.name.startswith("rollmill-process-sandboxes-") and not root.exists()
