"""Run an external agent harness inside a task's sandbox against the model proxy, and turn what
the proxy recorded into a trainable trajectory: one row (one chunk) per model call.

The harness reaches the policy only through the proxy's Unix socket, bound into the sandbox, so the
sandbox keeps no network. Whatever the harness does with its context between calls (compression,
summaries), each call's exact prompt and sampled tokens are what training sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rollmill.proxy import calls_to_trajectory
from rollmill.sandbox import Mount, SandboxBackend
from rollmill.sandbox.spec import ExecResult
from rollmill.terminal.task import TerminalTask, VerifierResult, start_task, verify
from rollmill.types import Trajectory

SOCKET_IN_SANDBOX = "/run/rollmill/model.sock"
MINI_AGENT = Path(__file__).resolve().parent / "harness" / "mini_agent.py"


@dataclass
class HarnessEpisode:
    trajectory: Trajectory
    harness: ExecResult
    verdict: VerifierResult


def run_harness_episode(backend: SandboxBackend, proxy, socket_path: str, task: TerminalTask, session: str,
                        harness: Path = MINI_AGENT, env: dict[str, str] | None = None,
                        seed: int = 0, group_id: int = 0, index: int = 0) -> HarnessEpisode:
    """Start `task`, run `harness` (a python3 script) in it with the proxy socket bound in, verify
    (always, even after a harness timeout), and build the trajectory from the session's calls."""
    sid = start_task(backend, task, mounts=[Mount(source=socket_path, target=SOCKET_IN_SANDBOX)])
    try:
        backend.put(sid, "/tmp/harness.py", harness.read_bytes())
        backend.put(sid, "/tmp/instruction.md", task.instruction.encode())
        variables = {"ROLLMILL_MODEL_SOCKET": SOCKET_IN_SANDBOX, "ROLLMILL_SESSION": session, **(env or {})}
        run = backend.exec(sid, ["python3", "/tmp/harness.py", "/tmp/instruction.md"], env=variables,
                           timeout_s=task.agent_timeout_s)
        verdict = verify(backend, sid, task)
    finally:
        backend.destroy(sid)
    calls = proxy.pop_calls(session)
    traj = calls_to_trajectory(calls, verdict.reward, prompt_id=seed, group_id=group_id, index=index,
                               success=verdict.reward >= 1.0, env_name=f"harness:{task.name}")
    return HarnessEpisode(traj, run, verdict)
