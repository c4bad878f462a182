"""`rollmill sandbox run|serve|sweep`: debug one command in a fresh sandbox, serve sandboxes over
HTTP, remove leftovers of crashed runs."""

from __future__ import annotations

import argparse
import sys

from rollmill.sandbox import make_backend
from rollmill.sandbox.spec import MiB, SandboxError, SandboxSpec, Status


def add_sandbox_parser(sub) -> None:
    p = sub.add_parser("sandbox", help="run a command in a sandbox, serve sandboxes over HTTP, sweep leftovers")
    p.set_defaults(func=sandbox_main)
    cmds = p.add_subparsers(dest="sandbox_command", required=True)
    run = cmds.add_parser("run", help="run one command in a fresh sandbox; print status, exit code, output")
    run.add_argument("--backend", default="bwrap", choices=["bwrap", "process"])
    run.add_argument("--workspace", help="host directory to show (copy-on-write) as the workdir")
    run.add_argument("--memory", default="512M", help="memory limit, e.g. 256M or 2G")
    run.add_argument("--cpus", type=float, default=1.0)
    run.add_argument("--pids", type=int, default=256)
    run.add_argument("--disk", default="256M", help="cap on everything the sandbox writes")
    run.add_argument("--timeout", type=float, default=30.0, help="wall-clock limit in seconds")
    run.add_argument("--network", default="none", choices=["none", "host"])
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sweep = cmds.add_parser("sweep", help="remove sandboxes, mounts and cgroups left by dead processes")
    sweep.add_argument("--root", help="the backend's state directory")
    serve = cmds.add_parser("serve", help="serve sandboxes over HTTP (FastAPI), bearer-token protected")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token-file", help="file holding the bearer token (else $ROLLMILL_SANDBOX_TOKEN)")
    serve.add_argument("--backend", default="bwrap", choices=["bwrap", "process"])
    serve.add_argument("--root", help="the backend's state directory")
    serve.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                       help="host directory clients may use as a workspace or mount source (repeatable)")
    serve.add_argument("--allow-host-network", action="store_true", help="let clients ask for network: host")
    serve.add_argument("--insecure-no-token", action="store_true",
                       help="serve WITHOUT a token (loopback hosts only): anyone who reaches the port runs commands")
    _add_ceiling_flags(serve)


def _add_ceiling_flags(serve) -> None:
    """The operator's ceilings (rollmill.sandbox.limits.Limits, whose field each `dest` is): a
    request over one gets a 400 naming it, never a clamp; the caps on counts get a 429."""
    size, count = {"type": parse_size, "metavar": "SIZE"}, {"type": int, "metavar": "N"}
    seconds = {"type": float, "metavar": "S"}
    for flag, dest, kind, what in [
        ("--max-request", "max_request_bytes", size, "request body (JSON, exec stdin in base64) [16M]"),
        ("--max-file", "max_file_bytes", size, "file upload or download, and spec.max_file_bytes [64M]"),
        ("--max-exec-timeout", "max_exec_timeout_s", seconds, "exec timeout_s and spec.exec_timeout_s [600]"),
        ("--max-output", "max_output_bytes", size, "exec and spec max_output_bytes [16M]"),
        ("--max-ttl", "max_ttl_s", seconds, "spec.ttl_s, the idle time before a sandbox is reaped [86400]"),
        ("--max-memory", "max_memory_bytes", size, "spec.memory_bytes [the host's RAM]"),
        ("--max-disk", "max_disk_bytes", size, "spec.disk_bytes [the host's RAM]"),
        ("--max-pids", "max_pids", count, "spec.pids [4096]"),
        ("--max-cpus", "max_cpus", {"type": float, "metavar": "N"}, "spec.cpus [the host's cpus]"),
        ("--max-sandboxes", "max_sandboxes", count, "live sandboxes [256]"),
        ("--max-concurrent-execs", "max_concurrent_execs", count, "commands running at once (exec, put, get) [64]"),
    ]:
        serve.add_argument(flag, dest=dest, help=f"ceiling on {what}", **kind)


def sandbox_main(args) -> int:
    if args.sandbox_command == "serve":
        from rollmill.sandbox.serve import serve_main
        return serve_main(args)
    if args.sandbox_command == "sweep":
        backend = make_backend("bwrap", **({"root": args.root} if args.root else {}), sweep=False)
        print(f"removed {backend.sweep()} leftover sandboxes")
        return 0
    return _run(args)


def parse_size(text: str) -> int:
    """'512M' -> bytes; plain numbers are bytes. Raises ValueError naming the text."""
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use bytes or a number with K, M or G") from None


def _run(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("rollmill sandbox run: give a command after --", file=sys.stderr)
        return 2
    try:
        spec = SandboxSpec(workspace=args.workspace, memory_bytes=parse_size(args.memory), cpus=args.cpus,
                           pids=args.pids, disk_bytes=parse_size(args.disk), exec_timeout_s=args.timeout,
                           network=args.network)
    except ValueError as e:
        print(f"rollmill sandbox run: {e}", file=sys.stderr)
        return 2
    backend = make_backend(args.backend)
    sid = None
    try:
        sid = backend.create(spec)
        result = backend.exec(sid, cmd)
    except SandboxError as e:
        print(f"status: {e.status.value}\n{e}", file=sys.stderr)
        return 3
    finally:
        if sid is not None:
            backend.destroy(sid)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    limit = f" limit={result.limit}" if result.limit else ""
    truncated = f" truncated ({result.output_bytes} bytes written)" if result.truncated else ""
    print(f"status={result.status.value} exit_code={result.exit_code} duration={result.duration_s:.3f}s"
          f"{limit}{truncated}", file=sys.stderr)
    if result.status is not Status.OK:
        return 3
    return result.exit_code if result.exit_code is not None else 3
