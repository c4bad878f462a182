"""Terminal tasks: shell tasks an agent solves inside a sandbox (Harbor / Terminal-Bench 2.0 layout)."""

from rollmill.terminal.check import CheckResult, add_tasks_parser, check_task, check_tasks, format_check
from rollmill.terminal.task import (TerminalTask, VerifierResult, builtin_tasks_dir, load_task, load_tasks,
                                    start_task, verify)

__all__ = ["CheckResult", "TerminalTask", "VerifierResult", "add_tasks_parser", "builtin_tasks_dir", "check_task",
           "check_tasks", "format_check", "load_task", "load_tasks", "start_task", "verify"]
