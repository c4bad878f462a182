"""The terminal env: an agent solves a shell task in a sandbox with four tools, and the task's
verifier decides the reward.

One timeout hierarchy, each limit named in `info["limit"]` when it fires:
command_timeout (one bash call) < agent_timeout (the task's [agent] budget) and max_steps (tool
calls); when either of the last two ends the episode, the verifier still runs and its reward is
kept. The verifier has its own [verifier] timeout ("verifier_timeout").

The agent budget counts the time the agent's tool calls ran, not the model's thinking time: in
batched RL rollout, model time depends on the batch size and the hardware, and an episode's outcome
must not.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
from typing import Any

from rollmill.envs.base import register_env
from rollmill.sandbox import SandboxError, make_backend
from rollmill.terminal.task import TerminalTask, select_tasks, start_task, verify

TOOLS = """You are working in a Linux shell sandbox (no network); your files are in /workspace.
Call exactly one tool per reply:
  bash: <command>            run a shell command in /workspace (each call is a fresh shell)
  read_file: <path>          print a file
  write_file: <path>         followed by the file's content on the next lines
  finish                     you are done; your work is checked
A ```bash code block (and no tool line) counts as a bash call."""
# a call may follow some prose: it starts at the first line that begins with a tool name
CALL = re.compile(r"^[ \t]*(bash|read_file|write_file|finish)\b[ \t]*:?[ \t]*(.*)", re.DOTALL | re.MULTILINE)
# what chat models write unprompted; an unclosed block (the reply hit its token limit) counts too
FENCE = re.compile(r"```(?:bash|sh|shell|console)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


_BACKENDS: dict[tuple[str, str | None], object] = {}
_BACKENDS_LOCK = threading.Lock()


def shared_backend(name: str, url: str | None = None):
    """One backend per process, name and url, shared by every env instance, closed at exit.
    A remote backend reads its token from $ROLLMILL_SANDBOX_TOKEN (never from a config file)."""
    # envs reset concurrently from the agent loop's threads: build each backend exactly once
    with _BACKENDS_LOCK:
        if (name, url) not in _BACKENDS:
            if name == "remote" and url is None:
                raise ValueError("backend 'remote' needs backend_url (a `rollmill sandbox serve` address)")
            kwargs = {"url": url, "token": os.environ.get("ROLLMILL_SANDBOX_TOKEN")} if name == "remote" else {}
            backend = make_backend(name, **kwargs)
            atexit.register(backend.close)
            _BACKENDS[(name, url)] = backend
        return _BACKENDS[(name, url)]


def parse_tool_call(text: str) -> tuple[str, str, str] | None:
    """(tool, argument, content) from `tool: argument` text or {"name", "arguments"} JSON, else None."""
    text = text.strip()
    if text.startswith("{"):
        try:
            call = json.loads(text)
            name, args = call.get("name") or call.get("tool"), call.get("arguments") or call.get("args") or {}
            if isinstance(args, str):
                args = json.loads(args)
        except (ValueError, AttributeError):
            return None
        if name == "bash" and isinstance(args.get("command"), str):
            return "bash", args["command"], ""
        if name in ("read_file", "write_file") and isinstance(args.get("path"), str):
            return name, args["path"], str(args.get("content", ""))
        return ("finish", "", "") if name == "finish" else None
    match = CALL.search(text)
    if match is None:
        fence = FENCE.search(text)
        return ("bash", fence.group(1).strip(), "") if fence and fence.group(1).strip() else None
    tool, rest = match.group(1), match.group(2)
    if tool == "write_file":
        path, _, content = rest.partition("\n")
        return (tool, path.strip(), content) if path.strip() else None
    if tool in ("bash", "read_file") and not rest.strip():
        return None
    return tool, rest.strip(), ""


def clip(text: str, limit: int) -> str:
    """Head and tail of a long text, with a note of what was cut."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"


@register_env("terminal", "shell tasks (Harbor layout) in a sandbox: bash/read_file/write_file/finish; reward from the task's verifier")
class TerminalEnv:
    """`reset(seed)` starts task `seed % len(tasks)` in a fresh sandbox (the previous one is destroyed).

    `backend` is any sandbox backend name; with "remote", `backend_url` names the sandbox server,
    which must allow the tasks directory (`rollmill sandbox serve --allow-path DIR`)."""

    instructions = TOOLS

    def __init__(self, tasks: str | None = None, names: list[str] | None = None, backend: str = "bwrap",
                 backend_url: str | None = None, max_steps: int = 8, command_timeout_s: float = 10.0, agent_timeout_s: float | None = None,
                 observation_chars: int = 1500):
        self.tasks: list[TerminalTask] = select_tasks(tasks, names)
        self.backend_name, self.backend_url = backend, backend_url
        self.max_steps, self.command_timeout_s = max_steps, command_timeout_s
        self.agent_timeout_s, self.observation_chars = agent_timeout_s, observation_chars
        self.sandbox_id: str | None = None
        self.task: TerminalTask | None = None

    @property
    def backend(self):
        return shared_backend(self.backend_name, self.backend_url)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.close()
        self.task = self.tasks[(seed or 0) % len(self.tasks)]
        self.sandbox_id = start_task(self.backend, self.task)
        self.steps, self.tool_seconds = 0, 0.0
        return self.task.instruction.strip(), {"state": (self.task.name, 0), "success": False, "task": self.task.name}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.sandbox_id is None:
            raise RuntimeError("step() before reset()")
        self.steps += 1
        call = parse_tool_call(action)
        info: dict[str, Any] = {"state": (self.task.name, self.steps), "invalid_action": call is None}
        if call is not None and call[0] == "finish":
            return self._finish("", info, limit=None)
        started = time.monotonic()
        obs = "Unknown tool call. " + TOOLS.split("\n", 1)[1] if call is None else self._run_tool(*call)
        self.tool_seconds += time.monotonic() - started
        budget = self.agent_timeout_s or self.task.agent_timeout_s
        if self.tool_seconds > budget:
            return self._finish(obs, info, limit="agent_timeout")
        if self.steps >= self.max_steps:
            return self._finish(obs, info, limit="max_steps")
        return obs, 0.0, False, False, {**info, "success": False}

    def _run_tool(self, tool: str, argument: str, content: str) -> str:
        sid, limit = self.sandbox_id, self.observation_chars
        try:
            if tool == "read_file":
                return clip(self.backend.get(sid, argument).decode(errors="replace"), limit)
            if tool == "write_file":
                self.backend.put(sid, argument, content.encode())
                return f"wrote {len(content.encode())} bytes to {argument}"
        except SandboxError as e:
            return f"error: {e}"
        result = self.backend.exec(sid, script=argument, timeout_s=self.command_timeout_s)
        output = clip(result.stdout + result.stderr, limit)
        if result.status.value == "timeout":
            return f"{output}\n[command_timeout: killed after {self.command_timeout_s:g}s]"
        return f"{output}\n[exit code {result.exit_code}]" if output else f"[exit code {result.exit_code}]"

    def _finish(self, obs: str, info: dict, limit: str | None):
        verdict = verify(self.backend, self.sandbox_id, self.task)
        info = {**info, "success": verdict.reward >= 1.0, "limit": limit or verdict.limit,
                "verifier_status": verdict.status.value, "verifier_reward": verdict.reward}
        note = f"[{limit}] " if limit else ""
        return f"{obs}\n{note}verifier reward: {verdict.reward:g}".strip(), verdict.reward, limit is None, \
            limit is not None, info

    def close(self) -> None:
        if self.sandbox_id is not None:
            self.backend.destroy(self.sandbox_id)
            self.sandbox_id = None
