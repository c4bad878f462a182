"""Terminal tasks in the Harbor / Terminal-Bench 2.0 layout, and running their verifiers in a sandbox.

A task is a directory:

    instruction.md          what the agent must do
    task.toml               timeouts and resource limits ([agent], [verifier], [environment])
    environment/workspace/  optional: the pristine /workspace
    environment/setup.sh    optional: run in /workspace before the agent starts
    tests/test.sh           the verifier; writes /logs/verifier/reward.txt (or reward.json)
    solution/solve.sh       the oracle (used by `rollmill tasks check`)

`start_task` builds the sandbox and runs the setup; `verify` uploads tests/ to /tests, runs test.sh
and reads the reward.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollmill.sandbox.backend import SandboxBackend
from rollmill.sandbox.spec import MiB, SandboxError, SandboxSpec, Status

# The sandbox root is read-only: every directory a task writes to (test files go to /tests) must be a
# scratch dir.
SCRATCH_DIRS = ("/tmp", "/logs", "/tests")
SETUP_PATH = "/tmp/.rollmill-setup.sh"
REWARD_DIR = "/logs/verifier"
OUTPUT_CHARS = 4000
DEFAULT_TIMEOUT_S = 600.0  # Harbor's default for the agent and the verifier
DEFAULT_SETUP_TIMEOUT_S = 120.0


@dataclass
class TerminalTask:
    """One task directory, parsed. Limits come from task.toml: missing timeouts take Harbor's default
    (600 s), missing resources SandboxSpec's; `setup_timeout_s` is [environment] build_timeout_sec."""

    name: str
    path: Path
    instruction: str
    agent_timeout_s: float = DEFAULT_TIMEOUT_S
    verifier_timeout_s: float = DEFAULT_TIMEOUT_S
    setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S
    cpus: float = 1.0
    memory_bytes: int = 512 * MiB
    disk_bytes: int = 256 * MiB
    network: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def workspace_dir(self) -> Path | None:
        """The pristine /workspace, or None for an empty one."""
        d = self.path / "environment" / "workspace"
        return d if d.is_dir() else None

    @property
    def setup_script(self) -> Path | None:
        f = self.path / "environment" / "setup.sh"
        return f if f.is_file() else None

    @property
    def tests_dir(self) -> Path:
        return self.path / "tests"

    @property
    def solution_dir(self) -> Path:
        return self.path / "solution"

    def spec(self, **overrides: Any) -> SandboxSpec:
        """The sandbox this task runs in; `overrides` replace any SandboxSpec field."""
        workspace = self.workspace_dir
        base = dict(
            # None is an empty workspace for every backend, and unlike a local temp dir it also
            # means something to a backend on another machine.
            workspace=str(workspace) if workspace else None,
            scratch_dirs=list(SCRATCH_DIRS),
            cpus=self.cpus,
            memory_bytes=self.memory_bytes,
            disk_bytes=self.disk_bytes,
            network=self.network,
        )
        return SandboxSpec(**{**base, **overrides})


@dataclass
class VerifierResult:
    """What the verifier decided. `reward` is 0 whenever `status` is not OK: `limit` names the limit
    that stopped it ("verifier_timeout"), `message` says why there is no reward."""

    reward: float
    status: Status
    limit: str | None = None
    exit_code: int | None = None
    output: str = ""
    message: str = ""


# ---------------------------------------------------------------------------------------------
# loading


def _table(data: dict, key: str, source: Path) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{source}: [{key}] must be a table, got {type(value).__name__}")
    return value


def _number(table: dict, section: str, key: str, default: float, source: Path, integer: bool = False) -> Any:
    value = table.get(key, default)
    kinds = (int,) if integer else (int, float)
    # bool is an int subclass, but `cpus = true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{source}: {section}.{key} must be {kind}, got {value!r}")
    return value


def load_task(path: str | Path) -> TerminalTask:
    """Parse one task directory; a ValueError names the file and the key or file that is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a task directory")
    for required in ("instruction.md", "task.toml", "tests/test.sh"):
        if not (path / required).is_file():
            raise ValueError(f"{path / required}: missing (every task needs instruction.md, task.toml, tests/test.sh)")
    instruction = (path / "instruction.md").read_text(encoding="utf-8").strip()
    if not instruction:
        raise ValueError(f"{path / 'instruction.md'}: empty")
    source = path / "task.toml"
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not valid TOML: {e}") from e
    agent, verifier = _table(data, "agent", source), _table(data, "verifier", source)
    env = _table(data, "environment", source)
    network = env.get("network", "none")
    if network not in ("none", "host"):
        raise ValueError(f"{source}: environment.network must be 'none' or 'host', got {network!r}")
    return TerminalTask(
        name=path.name,
        path=path,
        instruction=instruction,
        agent_timeout_s=float(_number(agent, "agent", "timeout_sec", DEFAULT_TIMEOUT_S, source)),
        verifier_timeout_s=float(_number(verifier, "verifier", "timeout_sec", DEFAULT_TIMEOUT_S, source)),
        setup_timeout_s=float(_number(env, "environment", "build_timeout_sec", DEFAULT_SETUP_TIMEOUT_S, source)),
        cpus=float(_number(env, "environment", "cpus", 1, source)),
        memory_bytes=_number(env, "environment", "memory_mb", 512, source, integer=True) * MiB,
        disk_bytes=_number(env, "environment", "storage_mb", 256, source, integer=True) * MiB,
        network=network,
        metadata=dict(_table(data, "metadata", source)),
    )


def load_tasks(directory: str | Path) -> list[TerminalTask]:
    """Every task under `directory` (one per subdirectory, hidden and `_` names skipped), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory of tasks")
    dirs = [d for d in directory.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))]
    return [load_task(d) for d in sorted(dirs, key=lambda d: d.name)]


def select_tasks(directory: str | Path | None, names: list[str] | None = None) -> list[TerminalTask]:
    """The tasks under `directory` (default: the built-in ones), only `names` when given; raises
    ValueError naming unknown names or an empty selection."""
    tasks = load_tasks(directory or builtin_tasks_dir())
    if names is not None:
        unknown = sorted(set(names) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"unknown terminal tasks {unknown}; allowed: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in names]
    if not tasks:
        raise ValueError(f"no terminal tasks in {directory or builtin_tasks_dir()}")
    return tasks


def builtin_tasks_dir() -> Path:
    """The tasks shipped with rollmill."""
    return Path(__file__).resolve().parent / "tasks"


# ---------------------------------------------------------------------------------------------
# running


def _require_isolated(backend: SandboxBackend) -> None:
    # The process backend maps absolute paths to the host: test.sh would write the host's /logs
    # and /tests, and `cd /workspace` would leave the sandbox.
    if getattr(backend, "name", None) == "process":
        raise SandboxError("terminal tasks use the absolute paths /workspace, /tests and /logs, which the "
                           "process backend maps to the host; use an isolated backend (bwrap)")


def _tail(*texts: str) -> str:
    text = "\n".join(t for t in texts if t)
    return text if len(text) <= OUTPUT_CHARS else "..." + text[-OUTPUT_CHARS:]


def upload_dir(backend: SandboxBackend, sandbox_id: str, source: Path, target: str) -> None:
    """Copy every file under host dir `source` to `target` inside the sandbox, keeping subdirs."""
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        backend.put(sandbox_id, f"{target}/{f.relative_to(source).as_posix()}", f.read_bytes())


def start_task(backend: SandboxBackend, task: TerminalTask, **spec_overrides: Any) -> str:
    """Create the task's sandbox and run environment/setup.sh in it; return the sandbox id.

    A setup that cannot be uploaded, fails or times out destroys the sandbox and raises SandboxError
    (INFRA_ERROR) naming the task: the task, not the agent, is broken.
    """
    _require_isolated(backend)
    sandbox_id = backend.create(task.spec(**spec_overrides))
    try:
        setup = task.setup_script
        if setup is not None:
            backend.put(sandbox_id, SETUP_PATH, setup.read_bytes())
            # The script is removed so the agent cannot read how its data was made.
            result = backend.exec(sandbox_id, script=f"bash {SETUP_PATH}; code=$?; rm -f {SETUP_PATH}; exit $code",
                                  timeout_s=task.setup_timeout_s)
            if not result.ok:
                why = result.limit or result.message or f"exit code {result.exit_code}"
                raise SandboxError(f"{why}: {_tail(result.stdout, result.stderr)}", Status.INFRA_ERROR)
    except SandboxError as e:
        backend.destroy(sandbox_id)
        raise SandboxError(f"task {task.name}: environment/setup.sh failed: {e}", Status.INFRA_ERROR) from e
    except BaseException:
        backend.destroy(sandbox_id)
        raise
    return sandbox_id


def _parse_reward(text: str, json_file: bool) -> float:
    value = json.loads(text)["reward"] if json_file else float(text.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return float(value)


def _read_reward(backend: SandboxBackend, sandbox_id: str) -> tuple[float | None, str]:
    """(reward, "") or (None, why there is none)."""
    for name, json_file in (("reward.txt", False), ("reward.json", True)):
        try:
            text = backend.get(sandbox_id, f"{REWARD_DIR}/{name}").decode("utf-8", errors="replace")
        except SandboxError:
            continue
        try:
            return _parse_reward(text, json_file), ""
        except (ValueError, KeyError, TypeError) as e:
            return None, f"{REWARD_DIR}/{name} holds no valid reward ({e}): {text[:200]!r}"
    return None, f"the verifier wrote neither {REWARD_DIR}/reward.txt nor reward.json"


def verify(backend: SandboxBackend, sandbox_id: str, task: TerminalTask) -> VerifierResult:
    """Upload tests/ to /tests, run `bash /tests/test.sh` in /workspace, and read the reward.

    A timeout, an OOM or a missing or malformed reward file gives reward 0 with `status` and `limit`
    or `message` saying why. Raises SandboxError when the tests cannot be uploaded.
    """
    _require_isolated(backend)
    # Whatever the agent left in /tests or as a reward file must not count.
    backend.exec(sandbox_id, script=f"rm -rf /tests/* /tests/.[!.]* {REWARD_DIR}/reward.txt {REWARD_DIR}/reward.json",
                 timeout_s=30)
    try:
        upload_dir(backend, sandbox_id, task.tests_dir, "/tests")
    except SandboxError as e:
        raise SandboxError(f"task {task.name}: could not upload tests/: {e}", e.status) from e
    run = backend.exec(sandbox_id, script="bash /tests/test.sh", timeout_s=task.verifier_timeout_s)
    output = _tail(run.stdout, run.stderr)
    if run.status is Status.TIMEOUT:
        return VerifierResult(0.0, Status.TIMEOUT, "verifier_timeout", run.exit_code, output,
                              f"test.sh ran past {task.verifier_timeout_s:g}s")
    if run.status is not Status.OK:
        return VerifierResult(0.0, run.status, run.limit, run.exit_code, output, run.message)
    reward, why = _read_reward(backend, sandbox_id)
    if reward is None:
        return VerifierResult(0.0, Status.ERROR, None, run.exit_code, output, why)
    return VerifierResult(reward, Status.OK, None, run.exit_code, output)
