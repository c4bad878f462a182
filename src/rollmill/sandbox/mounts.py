"""Host-side filesystems of one sandbox: a size-capped tmpfs holding every writable layer, and an
overlay that makes the task's workspace copy-on-write (reset = drop the upper layer)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount(source: str, target: str | Path, fstype: str, options: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0, options.encode()) != 0:
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
    """Layout under `root`: a tmpfs of `disk_bytes` with upper/, work/, scratch/<i>/, and the
    overlay mounted at merged/ (lower = the pristine workspace; an empty dir when there is none)."""

    def __init__(self, root: Path, lower: str | None, scratch_count: int):
        self.root = root
        self.lower = lower
        self.scratch = [root / "scratch" / str(i) for i in range(scratch_count)]
        self.merged = root / "merged"

    def create(self, disk_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        mount("tmpfs", self.root, "tmpfs", f"size={disk_bytes},mode=0700")
        self._populate()

    def _populate(self) -> None:
        for d in ("upper", "work", "merged", "empty", *(f"scratch/{i}" for i in range(len(self.scratch)))):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        lower = self.lower or str(self.root / "empty")
        mount("overlay", self.merged, "overlay",
              f"lowerdir={lower},upperdir={self.root / 'upper'},workdir={self.root / 'work'}")

    def reset(self) -> None:
        """Drop every write: unmount the overlay, empty the tmpfs, mount a fresh overlay."""
        unmount(self.merged)
        for child in self.root.iterdir():
            shutil.rmtree(child, ignore_errors=True)
        self._populate()

    def disk_used(self) -> int | None:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def destroy(self) -> None:
        remove_tree(self.root)


def remove_tree(root: Path) -> None:
    """Unmount everything under and at `root`, then delete it."""
    for point in mounts_under(root):
        unmount(point)
    unmount(root)
    shutil.rmtree(root, ignore_errors=True)
