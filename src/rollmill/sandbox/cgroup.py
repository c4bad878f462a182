"""cgroup v1 limits for one sandbox: memory, pids, cpu quota, plus freezer (to kill a tree that
keeps forking) and cpuacct (cpu seconds). Each sandbox gets `<controller>/rollmill/<id>`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
PARENT = "rollmill"
CPU_PERIOD_US = 100_000


def cgroups_available(root: Path = CGROUP_ROOT) -> bool:
    """True when every controller we use is a writable cgroup v1 hierarchy."""
    return all((root / c / "cgroup.procs").exists() and os.access(root / c, os.W_OK) for c in CONTROLLERS)


class Cgroup:
    """The cgroups of one sandbox; every method tolerates a cgroup that is already gone."""

    def __init__(self, name: str, root: Path = CGROUP_ROOT):
        self.name = name
        self.dirs = {c: root / c / PARENT / name for c in CONTROLLERS}

    def create(self, memory_bytes: int, pids: int, cpus: float) -> None:
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        mem = self.dirs["memory"]
        _write(mem / "memory.limit_in_bytes", memory_bytes)
        if (mem / "memory.memsw.limit_in_bytes").exists():  # no swapping around the limit
            _write(mem / "memory.memsw.limit_in_bytes", memory_bytes)
        _write(self.dirs["pids"] / "pids.max", pids)
        _write(self.dirs["cpu"] / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(self.dirs["cpu"] / "cpu.cfs_quota_us", int(cpus * CPU_PERIOD_US))

    def procs_files(self) -> list[str]:
        """The files a process writes its pid into to join every controller."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> list[int]:
        text = _read(self.dirs["pids"] / "cgroup.procs")
        return [int(p) for p in text.split()] if text else []

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed so far."""
        for line in _read(self.dirs["memory"] / "memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def stats(self) -> dict:
        mem, acct = self.dirs["memory"], self.dirs["cpuacct"]
        return {
            "memory_peak_bytes": _int(_read(mem / "memory.max_usage_in_bytes")),
            "cpu_seconds": (_int(_read(acct / "cpuacct.usage")) or 0) / 1e9,
            "pids": _int(_read(self.dirs["pids"] / "pids.current")),
        }

    def kill_all(self, deadline_s: float = 5.0) -> None:
        """SIGKILL every process: freeze first so a fork bomb cannot outrun the kill loop."""
        freezer = self.dirs["freezer"] / "freezer.state"
        if not freezer.exists():
            return
        end = time.monotonic() + deadline_s
        while self.pids() and time.monotonic() < end:
            _write(freezer, "FROZEN", missing_ok=True)
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _write(freezer, "THAWED", missing_ok=True)  # frozen tasks cannot die
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is left and delete the cgroups (retried: a dying task can hold one briefly)."""
        self.kill_all()
        for d in self.dirs.values():
            for _ in range(200):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)

    def exists(self) -> bool:
        return any(d.exists() for d in self.dirs.values())


def leftover_cgroups(root: Path = CGROUP_ROOT) -> set[str]:
    """Names of every sandbox cgroup under our parent, in any controller."""
    names: set[str] = set()
    for c in CONTROLLERS:
        parent = root / c / PARENT
        if parent.is_dir():
            names.update(p.name for p in parent.iterdir() if p.is_dir())
    return names


def _write(path: Path, value, missing_ok: bool = False) -> None:
    try:
        path.write_text(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, OSError):
        return ""


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text else None
