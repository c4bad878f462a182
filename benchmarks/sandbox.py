"""Sandbox latency, density and hygiene on this machine, next to same-run baselines.

Measures, with the bubblewrap backend (cgroup limits + overlay workspace):
- create + first exec (`true`) latency, p50/p99, and destroy;
- exec round trip on a live sandbox, p50/p99;
- how many sandboxes this machine holds at once, each running a process (`sleep`), up to --max-live;
- after all of it: no sandbox process, cgroup, mount or directory left behind.
Baselines in the same run: a plain host fork/exec of `true`, and a bare `bwrap --unshare-all true`.

    python benchmarks/sandbox.py [--cycles 300] [--max-live 256]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from rollmill.sandbox import SandboxSpec
from rollmill.sandbox.bwrap import BwrapBackend
from rollmill.sandbox.cgroup import leftover_cgroups
from rollmill.sandbox.mounts import mounts_under


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def hold_live(backend: BwrapBackend, spec: SandboxSpec, max_live: int) -> tuple[int, float]:
    """Create sandboxes each running `sleep` until max_live or a failure; return (count, seconds)."""
    ids, threads, failures = [], [], []
    start = time.perf_counter()
    for _ in range(max_live):
        try:
            sid = backend.create(spec)
        except Exception as e:  # the machine's limit is what we measure
            failures.append(repr(e))
            break
        ids.append(sid)
        t = threading.Thread(target=lambda s=sid: backend.exec(s, ["sleep", "20"], timeout_s=20), daemon=True)
        t.start()
        threads.append(t)
    time.sleep(1.0)
    alive = sum(1 for sid in ids if (backend.stats(sid).pids or 0) > 0)
    elapsed = time.perf_counter() - start
    for sid in ids:
        backend.destroy(sid)
    for t in threads:
        t.join(timeout=5)
    if failures:
        print(f"stopped at {len(ids)} sandboxes: {failures[0]}")
    return alive, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--max-live", type=int, default=256)
    args = parser.parse_args()

    host = timed(lambda: subprocess.run(["true"], check=True), args.cycles)
    bwrap = shutil.which("bwrap")
    bare_argv = [bwrap, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr",
                 "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                 "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]
    bare = timed(lambda: subprocess.run(bare_argv, check=True), args.cycles)

    root = Path(tempfile.mkdtemp(prefix="rollmill-bench-"))
    root.chmod(0o711)  # the sandbox identity must pass through to the state root (docs/sandbox.md)
    backend = BwrapBackend(root=root / "sb")
    workspace = root / "ws"
    workspace.mkdir()
    (workspace / "data.txt").write_text("x" * 4096)
    spec = SandboxSpec(workspace=str(workspace), memory_bytes=256 * 2**20, pids=64, cpus=1.0)

    create_first, destroy = [], []
    for _ in range(args.cycles):
        t = time.perf_counter()
        sid = backend.create(spec)
        assert backend.exec(sid, ["true"]).ok
        create_first.append(time.perf_counter() - t)
        t = time.perf_counter()
        backend.destroy(sid)
        destroy.append(time.perf_counter() - t)

    sid = backend.create(spec)
    exec_rt = timed(lambda: backend.exec(sid, ["true"]), args.cycles)
    backend.destroy(sid)

    live, live_s = hold_live(backend, spec, args.max_live)
    backend.close()
    leftovers = (len(list((root / "sb").iterdir())) + len(mounts_under(root))
                 + len([n for n in leftover_cgroups() if n.startswith(backend.cgroup_prefix)]))
    shutil.rmtree(root, ignore_errors=True)

    print(f"host fork+exec `true`:        p50 {pct(host, .5):6.2f} ms  p99 {pct(host, .99):6.2f} ms")
    print(f"bare bwrap `true`:            p50 {pct(bare, .5):6.2f} ms  p99 {pct(bare, .99):6.2f} ms")
    print(f"sandbox create + first exec:  p50 {pct(create_first, .5):6.2f} ms  p99 {pct(create_first, .99):6.2f} ms")
    print(f"sandbox exec round trip:      p50 {pct(exec_rt, .5):6.2f} ms  p99 {pct(exec_rt, .99):6.2f} ms")
    print(f"sandbox destroy:              p50 {pct(destroy, .5):6.2f} ms  p99 {pct(destroy, .99):6.2f} ms")
    print(f"live sandboxes, each running a process: {live} of {args.max_live} tried ({live_s:.1f} s to start)")
    print(f"leftovers after {args.cycles} cycles + the density run: {leftovers}")
    print(f"RESULT create_first_exec_p50_ms={pct(create_first, .5):.2f} create_first_exec_p99_ms={pct(create_first, .99):.2f} "
          f"exec_p50_ms={pct(exec_rt, .5):.2f} exec_p99_ms={pct(exec_rt, .99):.2f} "
          f"destroy_p50_ms={pct(destroy, .5):.2f} host_exec_p50_ms={pct(host, .5):.2f} "
          f"bare_bwrap_p50_ms={pct(bare, .5):.2f} exec_over_bare_bwrap={statistics.median(exec_rt) / statistics.median(bare):.2f} "
          f"live_sandboxes={live} leftovers={leftovers}")


if __name__ == "__main__":
    main()
