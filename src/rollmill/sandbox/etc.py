"""The `/etc` a sandbox sees: a few files written for it, plus the host entries that programs need
to run and that hold nothing private (loader cache, CA certificates, alternatives, timezone).

Nothing else of the host's `/etc` is shown, and of the listed entries only what every host user may
read anyway: the sandbox sees exactly what this module chose (docs/sandbox.md, "Isolation").
"""

from __future__ import annotations

import fnmatch
import functools
import os
import stat
from pathlib import Path

HOST_ETC = Path("/etc")
# host entries shown as they are (directories recursively); everything else in /etc stays hidden
SHOWN = ("alternatives", "bash.bashrc", "ca-certificates", "debian_version", "gai.conf", "host.conf",
         "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias", "localtime", "magic",
         "magic.mime", "mime.types", "mtab", "networks", "os-release", "perl", "profile", "profile.d",
         "protocols", "python3*", "rpc", "services", "shells", "ssl", "terminfo", "timezone", "vim")
MAX_FILE_BYTES = 4 * 1024 * 1024  # a file this large under /etc is not configuration


def generated(uid: int, workdir: str, network: str) -> dict[str, str]:
    """Files written for the sandbox: its users, its host name, and name resolution."""
    users = {0: ("root", "/root", "/bin/bash"), 65534: ("nobody", "/nonexistent", "/usr/sbin/nologin")}
    users.setdefault(uid, ("sandbox", workdir, "/bin/bash"))
    groups = {0: "root", 65534: "nogroup", uid: users[uid][0]}
    resolv = _host_text("resolv.conf") if network == "host" else "# this sandbox has no network\n"
    return {
        "passwd": "".join(f"{name}:x:{u}:{u}:{name}:{home}:{shell}\n" for u, (name, home, shell) in sorted(users.items())),
        "group": "".join(f"{name}:x:{g}:\n" for g, name in sorted(groups.items())),
        "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": "sandbox\n",
        "resolv.conf": resolv,
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
                         "networks: files\nprotocols: files\nservices: files\n",
    }


@functools.lru_cache(maxsize=1)
def host_entries() -> tuple[tuple[str, str, bytes | str, int], ...]:
    """(relative path, kind, content or link target, mode) of every shown host entry, read once.

    Only world-readable files and world-searchable directories are taken, so what a sandbox sees is
    never more than an unprivileged host user could read.
    """
    found: list[tuple[str, str, bytes | str, int]] = []
    if not HOST_ETC.is_dir():
        return ()
    for name in sorted(os.listdir(HOST_ETC)):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in SHOWN):
            _collect(HOST_ETC, name, found)
    return tuple(found)


def write_etc(dest: Path, uid: int, workdir: str, network: str) -> int:
    """Write the sandbox's /etc into `dest` (which must not exist); return the bytes written."""
    dest.mkdir(mode=0o755)
    written = 0
    for rel, kind, payload, mode in host_entries():
        target = dest / rel
        if kind == "dir":
            target.mkdir(mode=0o755)
        elif kind == "link":
            os.symlink(payload, target)
        else:
            written += _write(target, payload, mode)
    for name, text in generated(uid, workdir, network).items():
        target = dest / name
        if target.is_symlink() or target.exists():
            target.unlink()
        written += _write(target, text.encode(), 0o644)
    return written


def _collect(base: Path, rel: str, found: list) -> None:
    path = base / rel
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        found.append((rel, "link", os.readlink(path), 0))
    elif stat.S_ISDIR(st.st_mode) and st.st_mode & 0o005 == 0o005:
        found.append((rel, "dir", b"", 0o755))
        for child in sorted(os.listdir(path)):
            _collect(base, f"{rel}/{child}", found)
    elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o004 and st.st_size <= MAX_FILE_BYTES:
        try:
            found.append((rel, "file", path.read_bytes(), st.st_mode & 0o755))
        except OSError:
            return


def _write(target: Path, data: bytes, mode: int) -> int:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(target, mode)
    return len(data)


def _host_text(name: str) -> str:
    try:
        return (HOST_ETC / name).read_text()
    except OSError:
        return ""
