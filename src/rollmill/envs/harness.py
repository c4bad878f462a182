"""The harness env: an external agent harness plays a whole terminal-task episode in the task's
sandbox, talking to the policy through the model proxy; the task's verifier decides the reward.

Unlike a step-by-step env, it plays its own episodes (`run_episode`; the agentic pipeline calls it
instead of its agent loop). Each episode gets a proxy of its own on a fresh Unix socket, bound into
the sandbox, whose engine is `EpisodeEngine`: every model call the harness makes becomes one
request to the rollout worker's `generate`, so it is batched with every other episode's calls and
sampled with the run's sampling parameters and the episode's seeds. The trajectory is the proxy's
record: one row (one chunk) per call, holding the exact prompt ids the chat template produced and
the sampled ids with the log-probs and per-token policy versions the rollout engine reported, which
is what the trainer's importance ratios compare against.

What the harness asks for is overridden where training needs it: temperature and top-p are the
run's (`rollout.sampling`, or `eval.*` for held-out episodes), since the trainer scores tokens at
that temperature; `max_tokens` is capped at the run's `max_new_tokens`; `seed` is replaced by
`request_seed(sample_seed, k)` for call k (a harness that sends the same seeds in every episode
would otherwise sample the same replies); `n` must be 1. `stop` strings are the harness's own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from rollmill.agent.env_calls import call_env
from rollmill.envs.base import register_env
from rollmill.envs.terminal import shared_backend
from rollmill.rollout.engine import Completion, Request, SamplingParams
from rollmill.rollout.sampling import request_seed
from rollmill.terminal.task import TerminalTask, select_tasks
from rollmill.types import Trajectory

Generate = Callable[[Request], Awaitable[Completion]]
# the harness, the verifier and the sandbox set-up each have their own timeout: this only bounds
# an episode whose sandbox hangs beyond all of them
SLACK_S = 60.0


class EpisodeEngine:
    """The engine behind one episode's proxy: each call is one request to the rollout worker's
    `generate` coroutine, awaited from the proxy's request thread on the worker's event loop."""

    name = "episode"

    def __init__(self, generate: Generate, loop: asyncio.AbstractEventLoop, sampling: SamplingParams,
                 sample_seed: int, max_context_tokens: int):
        self._generate, self._loop = generate, loop
        self.sampling, self.sample_seed, self.max_context_tokens = sampling, sample_seed, max_context_tokens
        self.calls = 0
        self.version = 0  # the policy version of the last reply (the proxy's /health shows it)
        self.closed = False  # the episode was cancelled or timed out: its harness gets no more replies

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None = None) -> list[Completion]:
        """One completion of the one prompt, under the run's sampling (see the module docstring).
        A ValueError is the proxy's 400 to the harness."""
        if self.closed:
            raise ValueError("the episode is over (cancelled or timed out)")
        if len(prompts) != 1 or sampling.n != 1:
            raise ValueError("a training harness asks for one completion per call (n=1)")
        params = replace(self.sampling, max_new_tokens=min(sampling.max_new_tokens, self.sampling.max_new_tokens),
                         stop=sampling.stop, n=1)
        if len(prompts[0]) + params.max_new_tokens > self.max_context_tokens:
            raise ValueError(f"the prompt ({len(prompts[0])} tokens) and reply ({params.max_new_tokens}) do not "
                             f"fit agent.max_context_tokens ({self.max_context_tokens})")
        request = Request(tuple(prompts[0]), params, request_seed(self.sample_seed, self.calls))
        self.calls += 1
        completion = asyncio.run_coroutine_threadsafe(self._generate(request), self._loop).result()
        self.version = completion.policy_version
        return [completion]


@register_env("harness", "an external agent harness (python3 script) solves terminal tasks through the model "
                          "proxy; reward from the task's verifier")
class HarnessEnv:
    """Episodes of terminal tasks (`tasks` dir, `names` like the terminal env) played by `harness`
    (a python3 script, by default the bundled mini agent) with `harness_env` extra environment variables;
    seed s plays task `s % len(tasks)`. `backend` is a local sandbox backend name: the proxy's socket
    is bound into the sandbox, so a remote sandbox server cannot reach it."""

    # not shown to the model: the harness writes its own prompts
    instructions = "An external agent harness solves the task's instruction in a sandbox; its verifier decides."

    def __init__(self, tasks: str | None = None, names: list[str] | None = None, backend: str = "bwrap",
                 harness: str | None = None, harness_env: dict[str, str] | None = None):
        from rollmill.terminal.harness_run import MINI_AGENT  # with the proxy stack, only once a run uses it

        if backend == "remote":
            raise ValueError("the harness env needs a local sandbox backend (the proxy socket is bound in)")
        self.tasks: list[TerminalTask] = select_tasks(tasks, names)
        self.backend_name = backend
        self.harness = Path(harness) if harness else MINI_AGENT
        if not self.harness.is_file():
            raise ValueError(f"harness script {self.harness} does not exist")
        self.harness_env = {k: str(v) for k, v in (harness_env or {}).items()}

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        """The instruction seed `seed`'s episode hands the harness (nothing is started)."""
        task = self.tasks[(seed or 0) % len(self.tasks)]
        return task.instruction.strip(), {"state": (task.name, 0), "success": False, "task": task.name}

    def step(self, action: str):
        raise TypeError("the harness env plays whole episodes (run_episode); there are no steps to take")

    async def run_episode(self, traj: Trajectory, env_seed: int, sample_seed: int, generate: Generate, *,
                          tokenizer, sampling: SamplingParams, max_context_tokens: int) -> Trajectory:
        """Play task `env_seed % len(tasks)` with the harness; `traj` gives the ids. The reward is
        the verifier's, on the last call; `info["limit"]` names a harness timeout or the verifier's."""
        task = self.tasks[env_seed % len(self.tasks)]
        engine = EpisodeEngine(generate, asyncio.get_running_loop(), sampling, sample_seed, max_context_tokens)
        deadline = task.setup_timeout_s + task.agent_timeout_s + task.verifier_timeout_s + SLACK_S
        try:
            result = await call_env(self._play, (task, engine, tokenizer, traj), deadline)
        finally:
            # a harness still running in its abandoned thread must not keep sampling for a dead episode
            engine.closed = True
        if not result.ok:
            traj.failed, traj.end_reason = True, "env_timeout" if result.timed_out else "env_error"
            traj.error = "the harness episode timed out" if result.timed_out else result.error
            return traj
        return result.value

    def _play(self, task: TerminalTask, engine: EpisodeEngine, tokenizer, traj: Trajectory) -> Trajectory:
        """The blocking episode (in its own thread): serve a proxy, run the harness, collect its calls."""
        from rollmill.proxy import ModelProxy
        from rollmill.terminal.harness_run import run_harness_episode

        proxy = ModelProxy(engine, tokenizer, default_max_tokens=engine.sampling.max_new_tokens,
                           max_tokens_limit=2**31, max_n=1, accept_any_model=True)
        socket_dir = tempfile.mkdtemp(prefix="rollmill-harness-")
        os.chmod(socket_dir, 0o711)  # the sandbox's host uid must pass through to reach the socket
        try:
            socket_path = proxy.serve_unix(os.path.join(socket_dir, "model.sock"))
            episode = run_harness_episode(shared_backend(self.backend_name), proxy, socket_path, task,
                                          session="episode", harness=self.harness, env=self.harness_env,
                                          seed=traj.prompt_id, group_id=traj.group_id, index=traj.index)
        finally:
            proxy.stop()
            shutil.rmtree(socket_dir, ignore_errors=True)
        return _finished(episode, traj, task)


def _finished(episode, traj: Trajectory, task: TerminalTask) -> Trajectory:
    """The proxy's trajectory with the pipeline's info; an episode without a model call cannot train."""
    out = episode.trajectory
    out.info = {**traj.info, "task": task.name,
                "verifier_status": episode.verdict.status.value, "harness_exit_code": episode.harness.exit_code}
    limit = "agent_timeout" if episode.harness.status.value == "timeout" else episode.verdict.limit
    if limit is not None:  # named limits become end/limit_* metrics, as the terminal env's do
        out.info["limit"] = limit
    if not out.rows:
        out.failed, out.end_reason = True, "env_error"
        out.error = f"the harness made no model call (exit code {episode.harness.exit_code}): " \
                    f"{episode.harness.stderr[-300:].strip()}"
    return out
