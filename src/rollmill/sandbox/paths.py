"""Host paths a sandbox is given (its workspace, mount sources), resolved once and held open, and
the descriptors bwrap inherits.

A path is checked and then used later only by its handle: the directory is walked one component at
a time with O_NOFOLLOW from an allowed root, so a symlink anywhere below that root is refused, and
what is mounted or copied afterwards is the object that was opened, whatever is renamed or swapped
at that path later (docs/sandbox.md, "Isolation").
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from rollmill.sandbox.spec import SandboxError, Status

PAGE = 4096


def open_held(path: str, allowed: tuple[str, ...] | None, what: str) -> int:
    """An O_PATH descriptor of `path`, opened without following any symlink below its root.

    `allowed=None` trusts the caller (a local run): the path is resolved once and walked from `/`.
    Otherwise the path must lie under one of the `allowed` directories (each trusted as the
    operator wrote it, symlinks included) and nothing below it may be a symlink.
    """
    if not os.path.isabs(path):
        raise SandboxError(f"{what} {path!r} must be an absolute host path")
    if allowed is None:
        root, rest = "/", os.path.realpath(path)
    else:
        root, rest = _allowed_root(os.path.normpath(path), allowed, what)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in rest.split("/") if p]:
            child = _open_component(part, fd, path, what)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _allowed_root(path: str, allowed: tuple[str, ...], what: str) -> tuple[str, str]:
    for root in allowed:
        for form in {os.path.normpath(root), os.path.realpath(root)}:
            if path == form or path.startswith(form.rstrip("/") + "/"):
                return os.path.realpath(root), path[len(form):]
    raise SandboxError(f"{what} {path!r} is outside the allowed host paths {list(allowed)}")


def _open_component(part: str, parent: int, path: str, what: str) -> int:
    try:
        fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except FileNotFoundError:
        raise SandboxError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise SandboxError(f"{what} {path!r}: {e.strerror}") from None
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise SandboxError(f"{what} {path!r} has a symlink at {part!r}: give the real path")
    return fd


def is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def copy_tree(src: int, dest: Path, owner: int) -> int:
    """Copy the directory held by `src` into `dest` (which exists), owned by `owner`.

    Regular files, directories and symlinks (as links: inside the sandbox they resolve in its own
    view) are copied with their permission bits (never set-id) and times; devices, sockets, fifos
    and other filesystems mounted below (like `cp -x`) are left out. Returns the bytes of tmpfs
    pages the copy takes.
    """
    return _copy_dir(src, dest, owner, os.fstat(src).st_dev)


def _copy_dir(src: int, dest: Path, owner: int, device: int) -> int:
    used = 0
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=src)
    try:
        names = os.listdir(listing)
    finally:
        os.close(listing)
    for name in names:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        target = dest / name
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), target)
        elif stat.S_ISDIR(st.st_mode) and st.st_dev == device:
            target.mkdir()
            child = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=src)
            try:
                used += _copy_dir(child, target, owner, device)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            used += _copy_file(name, src, target, st.st_size)
        else:
            continue
        _own(target, st, owner)
    return used


def _copy_file(name: str, parent: int, target: Path, size: int) -> int:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    with os.fdopen(fd, "rb") as source, open(target, "xb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        copied = out.tell()
    return -(-max(copied, size, 1) // PAGE) * PAGE


def _own(target: Path, st: os.stat_result, owner: int) -> None:
    os.chown(target, owner, owner, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, st.st_mode & 0o1777)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def check_passable(root: Path, uid: int) -> None:
    """bwrap, running as `uid`, checks each descriptor it binds against its path: every directory
    above the state root must let that uid through."""
    for directory in [*reversed(root.resolve().parents), root.resolve()]:
        st = directory.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            raise SandboxError(f"sandbox state root {root}: {directory} does not let the sandbox identity "
                               f"(uid {uid}) pass (chmod o+x {directory}, or choose another root)",
                               Status.INFRA_ERROR)


def memfd(name: str, data: bytes) -> int:
    """An anonymous file holding `data`, rewound, for bwrap to read through its descriptor."""
    fd = os.memfd_create(f"rollmill-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def close_all(fds) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
