"""Host-side filesystems of one sandbox: a size-capped tmpfs holding every layer, and an overlay
that makes the task's workspace copy-on-write (reset = drop the upper layer)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

from rollmill.sandbox.etc import write_etc
from rollmill.sandbox.paths import copy_tree

MNT_DETACH = 2
MS_REMOUNT = 32
UNCAPPED_BYTES = 1 << 40
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount(source: str, target: str | Path, fstype: str, options: str, flags: int = 0) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, options.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount -t {fstype} {target} ({options}): {os.strerror(errno)}")


def unmount(target: str | Path) -> None:
    """Detach a mount; a path that is not mounted is fine."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        if errno not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise OSError(errno, f"umount {target}: {os.strerror(errno)}")


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below `base`, deepest first (the order to unmount them)."""
    prefix = str(base).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class SandboxFS:
    """Everything one sandbox writes or is shown from the host side, on one tmpfs at `root`.

    lower/    a private copy of the workspace, owned by the sandbox's identity (`owner`)
    etc/      the sandbox's own /etc (rollmill.sandbox.etc)
    upper/, work/, merged/   the overlay over lower/: merged/ is the workdir, reset drops upper/
    scratch/<i>/             the other writable directories (/tmp, ...)

    lower/ and etc/ are written once at create; the tmpfs is then capped at their size plus
    `disk_bytes`, so the sandbox's own writes get exactly `disk_bytes`. The overlay is mounted
    through descriptors, so its options (visible in the sandbox's mountinfo) hold no host path, and
    bubblewrap gets every directory as a descriptor (`handles`), never as a path. The tmpfs is
    mode 0711: bwrap (running as the sandbox's identity) checks a descriptor against its path, so
    it must be able to pass through, but nothing here can be listed.
    """

    def __init__(self, root: Path, owner: int, scratch_count: int):
        self.root = root
        self.owner = owner
        self.scratch = [root / "scratch" / str(i) for i in range(scratch_count)]
        self.merged = root / "merged"
        self.base_bytes = 0
        self._handles: dict[str, int] = {}

    def create(self, disk_bytes: int, workspace: int | None, uid: int, workdir: str, network: str) -> None:
        """Mount the tmpfs, copy the workspace held by descriptor `workspace`, write /etc, mount the overlay."""
        self.root.mkdir(parents=True, exist_ok=True)
        # roomy until capped below (a tmpfs mounted unlimited cannot be limited later)
        mount("tmpfs", self.root, "tmpfs", f"size={UNCAPPED_BYTES},mode=0711")
        lower = self.root / "lower"
        lower.mkdir()
        if workspace is not None:
            copy_tree(workspace, lower, self.owner)
        os.chown(lower, self.owner, self.owner)
        write_etc(self.root / "etc", uid, workdir, network)
        self.base_bytes = self._used()
        mount("tmpfs", self.root, "tmpfs", f"size={self.base_bytes + disk_bytes},mode=0711", MS_REMOUNT)
        self._populate()

    def _populate(self) -> None:
        for d in ("upper", "work", "merged", *(f"scratch/{i}" for i in range(len(self.scratch)))):
            (self.root / d).mkdir(parents=True, exist_ok=True)
            os.chown(self.root / d, self.owner, self.owner)
        layers = {name: _open_path(self.root / name) for name in ("lower", "upper", "work")}
        try:
            mount("overlay", self.merged, "overlay",
                  ",".join(f"{name}dir=/proc/self/fd/{fd}" for name, fd in layers.items()))
        finally:
            for fd in layers.values():
                os.close(fd)
        self._handles = {"merged": _open_path(self.merged), "etc": _open_path(self.root / "etc"),
                         **{f"scratch/{i}": _open_path(p) for i, p in enumerate(self.scratch)}}

    def handles(self) -> dict[str, int]:
        """Fresh duplicates of the descriptors of merged/, etc/ and scratch/<i>/: the caller closes
        them, so a reset closing the originals never pulls one from under a running exec."""
        return {name: os.dup(fd) for name, fd in self._handles.items()}

    def reset(self) -> None:
        """Drop every write: unmount the overlay, empty its layers and the scratch dirs, remount."""
        self._close_handles()
        unmount(self.merged)
        for name in ("upper", "work", "merged", "scratch"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        self._populate()

    def disk_used(self) -> int | None:
        """Bytes the sandbox has written (the workspace copy and /etc not counted)."""
        try:
            return max(0, self._used() - self.base_bytes)
        except OSError:
            return None

    def _used(self) -> int:
        st = os.statvfs(self.root)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def destroy(self) -> None:
        self._close_handles()
        remove_tree(self.root)

    def _close_handles(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles = {}


def _open_path(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def remove_tree(root: Path) -> None:
    """Unmount everything under and at `root`, then delete it."""
    for point in mounts_under(root):
        unmount(point)
    unmount(root)
    shutil.rmtree(root, ignore_errors=True)
