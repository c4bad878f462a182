"""What a sandbox may see of the host, and what it may ask of the kernel (docs/sandbox.md).

Each test is one attack from the hardening review: host files only root may read, read directly,
through a symlink followed by `get()`, or from a bind source; a bind source or workspace swapped for
a symlink between create, exec and reset; syscalls no shell needs; host paths of the sandbox state
leaking through mountinfo or a command line.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from rollmill.sandbox.spec import Mount, SandboxError, SandboxSpec

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def backend(tmp_path):
    from rollmill.sandbox.bwrap import BwrapBackend

    b = BwrapBackend(root=tmp_path / "sandboxes")
    yield b
    b.close()


def root_only_files(base: Path, limit: int = 6) -> list[Path]:
    """Regular files under `base` that only root may read."""
    found = []
    for path in sorted(base.rglob("*")):
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o004:
            found.append(path)
            if len(found) == limit:
                break
    return found


def secret_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A host directory others may enter, holding files only root may read."""
    d = tmp_path / "secrets"
    d.mkdir()
    os.chmod(d, 0o755)
    files = []
    for name in ("shadow.bak", "api-token", "id_rsa"):
        f = d / name
        f.write_text(f"SECRET-{name}\n")
        os.chmod(f, 0o600)
        files.append(f)
    return d, files


def canary_dir(tmp_path: Path) -> Path:
    """A host directory outside any policy, with a file a swap must never reveal."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("OUTSIDE-THE-POLICY\n")
    return outside


def test_sandboxed_code_runs_as_an_identity_that_owns_nothing_on_the_host(backend, tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    for uid in (0, 1000):
        sid = backend.create(SandboxSpec(uid=uid, mounts=[Mount(source=str(out), target="/out", writable=True)]))
        result = backend.exec(sid, script=f"id -u; touch /out/made-by-{uid}")
        assert result.ok and result.stdout == f"{uid}\n", result
        owner = (out / f"made-by-{uid}").stat().st_uid
        assert owner not in (0, 1000) and owner == backend.host_uid


def test_root_only_host_files_are_unreadable_directly_and_through_get(backend, tmp_path):
    secrets, own = secret_dir(tmp_path)
    targets = [*root_only_files(Path("/etc")), *own]
    assert len(targets) >= 4
    workspace = tmp_path / "ws"
    workspace.mkdir()
    sid = backend.create(SandboxSpec(workspace=str(workspace), mounts=[Mount(source=str(secrets), target="/secrets")]))
    for target in targets:
        inside = f"/secrets/{target.name}" if target.parent == secrets else str(target)
        result = backend.exec(sid, ["cat", inside])
        assert result.exit_code != 0 and "SECRET" not in result.stdout, (target, result)
        assert result.stdout == "", (target, result.stdout[:80])
        assert backend.exec(sid, ["ln", "-sfn", inside, "/workspace/link"]).ok
        with pytest.raises(SandboxError):
            backend.get(sid, "/workspace/link")


def test_etc_shows_only_chosen_entries(backend):
    sid = backend.create(SandboxSpec())
    shown = set(backend.exec(sid, ["ls", "-A", "/etc"]).stdout.split())
    assert {"passwd", "group", "hosts", "resolv.conf", "ld.so.cache"} <= shown
    assert not shown & {"shadow", "gshadow", "shadow-", "gshadow-", "sudoers", "machine-id", "ssh", "fstab"}
    passwd = backend.exec(sid, ["cat", "/etc/passwd"]).stdout
    host_names = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines() if line}
    assert {line.split(":")[0] for line in passwd.splitlines()} <= {"root", "nobody", "sandbox"} < host_names | {"sandbox"}
    # what programs need still works: loader cache, alternatives, shell, python
    assert backend.exec(sid, script="awk 'BEGIN{print 6*7}'; getent hosts localhost | head -1").stdout.startswith("42\n")


def test_swapping_a_bind_source_for_a_symlink_after_create_mounts_nothing_new(backend, tmp_path):
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub" / "data.txt").write_text("allowed data\n")
    outside = canary_dir(tmp_path)
    os.chmod(shared, 0o777)  # the attacker's sandbox may write here
    attacker = backend.create(SandboxSpec(mounts=[Mount(source=str(shared), target="/shared", writable=True)]))
    victim = backend.create(SandboxSpec(mounts=[Mount(source=str(shared / "sub"), target="/data", writable=True)]))
    assert backend.exec(victim, ["cat", "/data/data.txt"]).stdout == "allowed data\n"
    swap = backend.exec(attacker, script=f"mv /shared/sub /shared/old && ln -s {outside} /shared/sub")
    assert swap.ok, swap
    after = backend.exec(victim, script="ls /data; cat /data/* 2>&1; echo pwned > /data/written")
    assert "OUTSIDE" not in after.stdout and "canary" not in after.stdout, after
    assert not (outside / "written").exists() and (outside / "canary.txt").read_text() == "OUTSIDE-THE-POLICY\n"


def test_swapping_the_workspace_for_a_symlink_before_reset_shows_nothing_new(backend, tmp_path):
    shared = tmp_path / "shared"
    (shared / "ws").mkdir(parents=True)
    (shared / "ws" / "task.txt").write_text("the task\n")
    outside = canary_dir(tmp_path)
    os.chmod(shared, 0o777)
    attacker = backend.create(SandboxSpec(mounts=[Mount(source=str(shared), target="/shared", writable=True)]))
    victim = backend.create(SandboxSpec(workspace=str(shared / "ws")))
    assert backend.exec(attacker, script=f"mv /shared/ws /shared/old && ln -s {outside} /shared/ws").ok
    backend.reset(victim)
    listing = backend.exec(victim, script="ls /workspace; cat /workspace/*")
    assert listing.stdout == "task.txt\nthe task\n", listing


def test_allowed_paths_refuse_symlinks_and_paths_outside(tmp_path):
    from rollmill.sandbox.bwrap import BwrapBackend

    allowed = tmp_path / "allowed"
    (allowed / "real").mkdir(parents=True)
    os.symlink(tmp_path, allowed / "link")
    b = BwrapBackend(root=tmp_path / "sb", allowed_paths=(str(allowed),))
    try:
        sid = b.create(SandboxSpec(workspace=str(allowed / "real")))
        assert b.exec(sid, ["true"]).ok
        for bad, why in [(allowed / "link", "symlink"), (tmp_path, "outside"), (allowed / "real" / ".." / "..", "outside"),
                         (allowed / "missing", "does not exist")]:
            with pytest.raises(SandboxError, match=why):
                b.create(SandboxSpec(workspace=str(bad)))
            with pytest.raises(SandboxError, match=why):
                b.create(SandboxSpec(mounts=[Mount(source=str(bad), target="/m")]))
    finally:
        b.close()


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs the system python3 inside the sandbox")
def test_seccomp_refuses_syscalls_shell_work_never_needs(backend):
    probe = r"""
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": dict(add_key=248, keyctl=250, io_uring_setup=425, bpf=321, unshare=272, userfaultfd=323),
      "aarch64": dict(add_key=217, keyctl=219, io_uring_setup=425, bpf=280, unshare=97, userfaultfd=282)}[sys.argv[1]]
params = (ctypes.c_char * 120)()
calls = dict(add_key=(b"user", b"k", b"v", 1, -2), keyctl=(0, -2), io_uring_setup=(4, params), bpf=(0, 0, 0),
             unshare=(0x10000000,), userfaultfd=(0,))
for name, args in calls.items():
    ctypes.set_errno(0)
    ret = libc.syscall(nr[name], *args)
    print(name, ret, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
"""
    import platform
    sid = backend.create(SandboxSpec())
    result = backend.exec(sid, [SYSTEM_PYTHON, "-c", probe, platform.machine()])
    assert result.ok, result
    for line in result.stdout.splitlines():
        name, ret, err = line.split()
        assert (ret, err) == ("-1", "EPERM"), line
    status = backend.exec(sid, ["grep", "Seccomp:", "/proc/self/status"]).stdout
    assert status.split() == ["Seccomp:", "2"]
    nested = backend.exec(sid, ["unshare", "--user", "--map-root-user", "true"])
    assert nested.exit_code != 0 and "Operation not permitted" in nested.stderr
    # ordinary work still runs: fork, exec, pipes, threads, files
    work = backend.exec(sid, [SYSTEM_PYTHON, "-c", "import subprocess, threading, tempfile; "
                              "t = threading.Thread(target=print); t.start(); t.join(); "
                              "print(subprocess.run(['sh', '-c', 'echo ok | cat'], capture_output=True, text=True).stdout, end='')"])
    assert work.stdout.endswith("ok\n"), work


def test_the_seccomp_program_matches_the_kernel_headers():
    from rollmill.sandbox import seccomp

    headers = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
               "aarch64": Path("/usr/include/asm-generic/unistd.h")}
    checked = 0
    for machine, header in headers.items():
        if not header.exists():
            continue
        text = header.read_text()
        for name, number in seccomp.SYSCALLS[machine].items():
            if f"__NR_{name} " in text or f"__NR3264_{name} " in text:
                line = next(ln for ln in text.splitlines() if ln.split()[1:2] in ([f"__NR_{name}"], [f"__NR3264_{name}"]))
                assert int(line.split()[2]) == number, (machine, name)
                checked += 1
        assert len(seccomp.program(machine)) % 8 == 0
    if checked == 0:
        pytest.skip("no kernel headers here")


def test_no_host_path_of_the_sandbox_state_in_mountinfo_or_command_lines(backend, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    sid = backend.create(SandboxSpec(workspace=str(workspace)))
    result = backend.exec(sid, script="cat /proc/self/mountinfo; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    assert result.ok, result
    assert str(backend.root) not in result.stdout and str(tmp_path) not in result.stdout, result.stdout


def test_root_only_host_files_stay_unreadable_through_the_server(tmp_path):
    import httpx

    from rollmill.sandbox.bwrap import BwrapBackend
    from rollmill.sandbox.serve import ServerThread
    from rollmill.sandbox.server import make_app

    secrets, own = secret_dir(tmp_path)
    targets = [*root_only_files(Path("/etc"), limit=3), *own]
    backend = BwrapBackend(root=tmp_path / "sb")
    headers = {"Authorization": "Bearer t0ken"}
    try:
        with ServerThread(make_app(backend, "t0ken", allowed_paths=(str(secrets),))) as server, \
                httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            spec = {"mounts": [{"source": str(secrets), "target": "/secrets"}]}
            sid = http.post("/sandboxes", json={"spec": spec}).json()["id"]
            for target in targets:
                inside = f"/secrets/{target.name}" if target.parent == secrets else str(target)
                direct = http.get(f"/sandboxes/{sid}/files", params={"path": inside})
                link = http.post(f"/sandboxes/{sid}/exec", json={"argv": ["ln", "-sfn", inside, "/workspace/l"]})
                assert link.json()["exit_code"] == 0
                followed = http.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/l"})
                for response in (direct, followed):
                    assert response.status_code == 400 and b"SECRET" not in response.content, (target, response.text)
    finally:
        backend.close()
