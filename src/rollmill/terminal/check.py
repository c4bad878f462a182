"""Checking tasks before training on them: the oracle must earn reward 1, doing nothing must earn 0.

A task that fails either check teaches nothing (or the wrong thing), so `rollmill tasks check` runs
both for every task: solution/solve.sh in a fresh sandbox then the verifier, and the verifier alone
in another fresh sandbox.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.spec import SandboxError
from rollmill.terminal.task import (SCRATCH_DIRS, TerminalTask, VerifierResult, builtin_tasks_dir, load_tasks,
                                    start_task, upload_dir, verify)

# Harbor runs the oracle as /solution/solve.sh; the sandbox root is read-only, hence a scratch dir.
SOLUTION_DIR = "/solution"


@dataclass
class CheckResult:
    """One task's check. A reward is None when that run could not happen (`message` says why)."""

    name: str
    oracle_reward: float | None
    empty_reward: float | None
    passed: bool
    message: str = ""


def _describe(result: VerifierResult) -> str:
    why = ", ".join(x for x in (result.status.value, result.limit, result.message) if x)
    output = result.output.strip().splitlines()
    return f"reward {result.reward:g} ({why})" + (f"; verifier output ends: {output[-1]}" if output else "")


def _run(backend: SandboxBackend, task: TerminalTask, oracle: bool) -> tuple[VerifierResult, str]:
    """The verifier's result after the oracle (or after nothing), and what went wrong with solve.sh."""
    sandbox_id = start_task(backend, task, scratch_dirs=[*SCRATCH_DIRS, SOLUTION_DIR])
    try:
        solve_note = ""
        if oracle:
            upload_dir(backend, sandbox_id, task.solution_dir, SOLUTION_DIR)
            run = backend.exec(sandbox_id, script=f"bash {SOLUTION_DIR}/solve.sh", timeout_s=task.agent_timeout_s)
            if not run.ok:
                tail = (run.stderr or run.stdout).strip().splitlines()
                why = run.limit or f"exit code {run.exit_code}"
                solve_note = f"solve.sh failed ({why})" + (f": {tail[-1]}" if tail else "")
        return verify(backend, sandbox_id, task), solve_note
    finally:
        backend.destroy(sandbox_id)


def check_task(backend: SandboxBackend, task: TerminalTask) -> CheckResult:
    """Run the oracle and the do-nothing agent on `task`; it passes with rewards 1.0 and 0.0."""
    if not (task.solution_dir / "solve.sh").is_file():
        return CheckResult(task.name, None, None, False, "no solution/solve.sh")
    try:
        oracle, solve_note = _run(backend, task, oracle=True)
        empty, _ = _run(backend, task, oracle=False)
    except SandboxError as e:
        return CheckResult(task.name, None, None, False, str(e))
    problems = []
    if oracle.reward != 1.0:
        problems.append(f"oracle: {_describe(oracle)}" + (f"; {solve_note}" if solve_note else ""))
    if empty.reward != 0.0:
        problems.append(f"no agent: {_describe(empty)}")
    return CheckResult(task.name, oracle.reward, empty.reward, not problems, "; ".join(problems))


def check_tasks(backend: SandboxBackend, tasks: list[TerminalTask]) -> list[CheckResult]:
    """`check_task` for each task, in order; every sandbox is destroyed whatever happens."""
    return [check_task(backend, task) for task in tasks]


def _reward(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def format_check(results: list[CheckResult]) -> str:
    """One line per task, then "N/M tasks pass"."""
    width = max((len(r.name) for r in results), default=0)
    lines = [
        f"{'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  oracle={_reward(r.oracle_reward)}"
        f"  empty={_reward(r.empty_reward)}" + (f"  {r.message}" if r.message else "")
        for r in results
    ]
    lines.append(f"{sum(r.passed for r in results)}/{len(results)} tasks pass")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line


def _selected(args) -> list[TerminalTask]:
    tasks = load_tasks(args.dir or builtin_tasks_dir())
    return [t for t in tasks if args.pattern in t.name] if args.pattern else tasks


def cmd_tasks_list(args) -> int:
    """`rollmill tasks list [DIR]`: one line per task."""
    try:
        tasks = _selected(args)
    except ValueError as e:
        print(f"rollmill: {e}", file=sys.stderr)
        return 2
    width = max((len(t.name) for t in tasks), default=0)
    for t in tasks:
        meta = f"{t.metadata.get('difficulty', '?')}/{t.metadata.get('category', '?')}"
        print(f"{t.name:<{width}}  {meta:<28}  {t.instruction.splitlines()[0]}")
    return 0


def cmd_tasks_check(args) -> int:
    """`rollmill tasks check [DIR]`: 0 when every selected task passes, 1 otherwise, 2 on bad input."""
    from rollmill.sandbox import make_backend

    try:
        tasks = _selected(args)
        backend = make_backend(args.backend)
    except (ValueError, SandboxError) as e:
        print(f"rollmill: {e}", file=sys.stderr)
        return 2
    if not tasks:
        print(f"rollmill: no task matches {args.pattern!r}", file=sys.stderr)
        return 2
    results = check_tasks(backend, tasks)
    print(format_check(results))
    return 0 if all(r.passed for r in results) else 1


def add_tasks_parser(subparsers) -> argparse.ArgumentParser:
    """Add `tasks list` and `tasks check` to a CLI's subparsers; each sets `func` to its handler."""
    parser = subparsers.add_parser("tasks", help="terminal tasks: list them, check their oracles and verifiers")
    sub = parser.add_subparsers(dest="tasks_command", required=True)
    dir_help = "a directory of task directories (default: the built-in tasks)"
    k_help = "only tasks whose name contains PATTERN"

    p = sub.add_parser("list", help="list the tasks of a directory")
    p.add_argument("dir", nargs="?", default=None, help=dir_help)
    p.add_argument("-k", dest="pattern", metavar="PATTERN", default=None, help=k_help)
    p.set_defaults(func=cmd_tasks_list)

    p = sub.add_parser("check", help="each oracle must earn reward 1, doing nothing must earn 0")
    p.add_argument("dir", nargs="?", default=None, help=dir_help)
    p.add_argument("--backend", choices=("bwrap", "process"), default="bwrap", help="sandbox backend")
    p.add_argument("-k", dest="pattern", metavar="PATTERN", default=None, help=k_help)
    p.set_defaults(func=cmd_tasks_check)
    return parser
