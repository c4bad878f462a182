"""The multi-turn agent: one episode is one coroutine that alternates engine replies and env steps.

Each episode awaits its own reply (the engine batches the replies of every episode that is ready,
see `rollmill.rollout.driver`) and its own env calls (each with a timeout), so one slow env or one
long reply holds up only its own episode. Replies are appended as sampled tokens, observations as
env tokens; an env that raises or hangs fails only its own episode. `AgentLoop.play` runs a list of
episodes in lockstep (turn t of every episode in one engine batch), the synchronous agent loop.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Awaitable, Callable

from rollmill.agent.chat import ChatFormat, PlainFormat, format_instruction, parse_action, stop_strings
from rollmill.agent.env_calls import CallResult, call_env
from rollmill.agent.tools import call_action, parse_tool_calls
from rollmill.config import AgentConfig
from rollmill.envs import Env
from rollmill.rollout import SamplingParams
from rollmill.rollout.driver import EngineDriver
from rollmill.rollout.engine import Completion, Request
from rollmill.rollout.sampling import request_seed
from rollmill.types import Row, Trajectory, Turn

OMITTED = "(observation omitted)"

Generate = Callable[[Request], Awaitable[Completion]]


class Agent:
    """Plays episodes: owns chat formatting, action parsing, the context policy and the turn limits."""

    def __init__(self, tokenizer, cfg: AgentConfig, sampling: SamplingParams, step_timeout_s: float = 30.0):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.chat = self._format(None)
        self._tool_formats: dict[str, ChatFormat | PlainFormat] = {}  # one per distinct tool list, probed once
        self.sampling = replace(sampling, n=1, stop=tuple(sampling.stop) + stop_strings(cfg.action_format, cfg.action_tag))
        self.timeout = step_timeout_s
        self.format_line = format_instruction(cfg.action_format, cfg.action_tag)

    def _format(self, tools: list[dict] | None) -> ChatFormat | PlainFormat:
        return ChatFormat(self.tokenizer, tools) if self.cfg.chat_template else PlainFormat(self.tokenizer, tools=tools)

    def chat_for(self, env: Env) -> ChatFormat | PlainFormat:
        """The chat format of `env`: with its tools when it declares OpenAI tool schemas in `env.tools`."""
        tools = getattr(env, "tools", None)
        if not tools:
            return self.chat
        key = json.dumps(tools, sort_keys=True)
        if key not in self._tool_formats:
            self._tool_formats[key] = self._format(list(tools))
        return self._tool_formats[key]

    def system_prompt(self, env: Env) -> str:
        """The env's instructions (or the configured prompt) and the action-format line; may be empty."""
        text = env.instructions if self.cfg.system_prompt is None else self.cfg.system_prompt
        lines = [text] + ([self.format_line] if self.cfg.format_hint else [])
        return "\n".join(line for line in lines if line)

    async def run_episode(self, env: Env, traj: Trajectory, env_seed: int, sample_seed: int,
                          generate: Generate, prefix: Trajectory | None = None, boundary: int = 0) -> Trajectory:
        """Play `traj` (empty, with its ids set) on `env` reset with `env_seed`; turn t samples with
        seed `request_seed(sample_seed, t)`.

        With `prefix` (an episode of the same env seed) and `boundary` k > 0 the episode starts from the
        state after the prefix's first k turns (IPA's chunk-level initialized resampling, see `_replay`).

        With env tools a reply's first native tool call (`rollmill.agent.tools`) is the action, as
        `{"name", "arguments"}` JSON, and the env's answer goes back in the `tool` role; a reply
        without one is parsed by the configured action format and answered as a user message.
        Each turn's call (OpenAI-shaped, or None) is kept in `traj.info["tool_calls"]`.
        """
        chat = self.chat_for(env)
        reset = await call_env(env.reset, (env_seed,), self.timeout)
        if not reset.ok or not _is_reset_result(reset.value):
            self._fail(traj, reset, "reset")
            return traj
        obs, info = reset.value
        traj.initial_observation, traj.initial_state, traj.initial_progress = obs, info.get("state"), info.get("progress")
        traj.info["state"] = traj.initial_state
        traj.info["system"] = self.system_prompt(env)
        if chat.tools:
            traj.info["tool_calls"] = []
        traj.rows.append(Row(chat.prompt(self._messages(traj, turn=0))))
        if boundary and not await self._replay(env, traj, prefix, boundary, chat):
            return traj
        for turn in range(boundary, self.cfg.max_turns):
            if not self._prepare_context(traj, turn, chat):
                return traj
            completion = await generate(Request(tuple(traj.rows[-1].context), self.sampling,
                                                request_seed(sample_seed, turn)))
            call = None
            if chat.tools:
                call = next(iter(parse_tool_calls(completion.text, id_prefix=f"call_{turn}_")[1]), None)
                traj.info["tool_calls"].append(call)
            action = call_action(call) if call else parse_action(completion.text, self.cfg.action_format,
                                                                 self.cfg.action_tag)
            traj.rows[-1].append_sampled(completion.token_ids, completion.logprobs, completion.versions, turn)
            result = await call_env(env.step, (action,), self.timeout) if action is not None else None
            self._record(traj, completion.text, completion.finish_reason, action, result, turn)
            if traj.end_reason != "running":
                return traj
        traj.end_reason = "max_turns"
        return traj

    async def _replay(self, env: Env, traj: Trajectory, prefix: Trajectory, boundary: int,
                      chat: ChatFormat | PlainFormat) -> bool:
        """Replay `prefix`'s first `boundary` turns on `env`, just reset with the prefix's seed.

        Its replies enter the row as env tokens (they train once, in `prefix`), its actions step the env,
        and each turn must come back with the observation and reward the prefix got: an env that is not
        deterministic for its seed fails the episode (False) instead of training on a state that never was."""
        for turn in range(boundary):
            if not self._prepare_context(traj, turn, chat):
                return False
            done = prefix.turns[turn]
            source_row = prefix.rows[done.row]
            reply_ids = [t for t, k in zip(source_row.token_ids, source_row.turn_of_token) if k == turn]
            traj.rows[-1].append_env(reply_ids)
            if chat.tools:
                traj.info["tool_calls"].append(prefix.info["tool_calls"][turn])
            result = await call_env(env.step, (done.action,), self.timeout) if done.action is not None else None
            self._record(traj, done.reply, done.finish_reason, done.action, result, turn)
            if traj.failed:
                return False
            again = traj.turns[-1]
            if (again.observation, again.reward) != (done.observation, done.reward) or traj.end_reason != "running":
                traj.failed, traj.end_reason = True, "env_error"
                traj.error = (f"replay of turn {turn} of episode {prefix.index}: the env answered differently "
                              "(resampling from a chunk boundary needs an env that is deterministic for its seed)")
                return False
        return True

    def _messages(self, traj: Trajectory, turn: int) -> list[dict]:
        """The conversation the model sees before `turn`, under the context policy."""
        system = [{"role": "system", "content": traj.info["system"]}] if traj.info["system"] else []
        messages = [*system, {"role": "user", "content": traj.initial_observation}]
        history = traj.turns[:turn]
        keep_from = 0 if self.cfg.context == "keep_all" else max(0, len(history) - self.cfg.window_turns)
        if self.cfg.context == "sliding_window" and keep_from > 0:
            messages = [*system, {"role": "user", "content": history[keep_from - 1].observation}]
        for k, t in enumerate(history):
            if self.cfg.context == "sliding_window" and k < keep_from:
                continue
            omit = self.cfg.context == "truncate_observations" and k < keep_from - 1
            # the reply's own text, never re-rendered from the parsed call: that is what was sampled
            messages.append({"role": "assistant", "content": t.reply})
            observation = OMITTED if omit else t.observation
            call = _tool_call(traj, k)
            messages.append({"role": "user", "content": observation} if call is None else
                            {"role": "tool", "content": observation, "tool_call_id": call["id"],
                             "name": call["function"]["name"]})
        return messages

    def _prepare_context(self, traj: Trajectory, turn: int, chat: ChatFormat | PlainFormat) -> bool:
        """Extend (or, when the context policy drops history, restart) the episode's row; False if it no longer fits."""
        if turn > 0:
            drops_from = {"keep_all": None, "sliding_window": 1, "truncate_observations": 2}[self.cfg.context]
            rewrites = drops_from is not None and turn >= self.cfg.window_turns + drops_from
            if rewrites:
                traj.rows.append(Row(chat.prompt(self._messages(traj, turn))))
            else:
                row = traj.rows[-1]  # it ends with the previous reply: observations are appended only here
                row.append_env(chat.observation(traj.turns[-1].observation, row.token_ids[-1:],
                                                _tool_call(traj, turn - 1)))
        if len(traj.rows[-1].context) + self.sampling.max_new_tokens > self.cfg.max_context_tokens:
            traj.end_reason = "context"
            return False
        return True

    def _record(self, traj: Trajectory, reply: str, finish_reason: str, action: str | None,
                result: CallResult | None, turn: int) -> None:
        state_before = traj.info.get("state")
        if action is None:
            traj.turns.append(Turn(reply, None, f"Invalid action. {self.format_line}", self.cfg.invalid_action_penalty,
                                   state_before, None, True, len(traj.rows) - 1, finish_reason))
            return
        if not result.ok or not _is_step_result(result.value):
            traj.turns.append(Turn(reply, action, "", 0.0, state_before, None, False, len(traj.rows) - 1,
                                   finish_reason))
            self._fail(traj, result, f"step {turn}")
            return
        obs, reward, terminated, truncated, info = result.value
        invalid = bool(info.get("invalid_action", False))
        reward = float(reward) + (self.cfg.invalid_action_penalty if invalid else 0.0)
        traj.turns.append(Turn(reply, action, obs, reward, state_before, info.get("progress"), invalid,
                               len(traj.rows) - 1, finish_reason))
        traj.info["state"] = info.get("state", state_before)
        if terminated or truncated:
            traj.success = bool(info.get("success", terminated and reward > 0))
            traj.end_reason = "terminated" if terminated else "env_truncated"
            if info.get("limit"):  # which of the env's own limits ended it (e.g. a terminal task's)
                traj.info["limit"] = str(info["limit"])

    def _fail(self, traj: Trajectory, result: CallResult, where: str) -> None:
        traj.failed = True
        if result.timed_out:
            traj.end_reason, traj.error = "env_timeout", f"{where}: no answer within {self.timeout:g}s"
        else:
            traj.end_reason = "env_error"
            traj.error = f"{where}: {result.error or f'returned {type(result.value).__name__}, not the env protocol shape'}"


class AgentLoop(Agent):
    """An `Agent` with an engine of its own, for playing a list of episodes in lockstep (tests, evals, tools)."""

    def __init__(self, engine, tokenizer, cfg: AgentConfig, sampling: SamplingParams, step_timeout_s: float = 30.0):
        super().__init__(tokenizer, cfg, sampling, step_timeout_s)
        self.engine = engine

    def play(self, envs: list[Env], seeds: list[int], group_ids: list[int], sample_seeds: list[int],
             env_name: str = "") -> list[Trajectory]:
        """One episode per env (reset with its seed), turn t of all of them in one engine batch;
        returns them in the same order. Turn t of episode i samples with `request_seed(sample_seeds[i], t)`."""
        return asyncio.run(self._play(envs, seeds, group_ids, sample_seeds, env_name))

    async def _play(self, envs, seeds, group_ids, sample_seeds, env_name) -> list[Trajectory]:
        driver = EngineDriver(self.engine)
        wave = driver.wave(list(range(len(envs))))

        async def one(k: int) -> Trajectory:
            traj = Trajectory(group_ids[k], k, seeds[k], info={"env": env_name})
            try:
                return await self.run_episode(envs[k], traj, seeds[k], sample_seeds[k],
                                              lambda request: driver.generate(request, wave, k))
            finally:
                wave.leave(k)

        try:
            return list(await asyncio.gather(*(one(k) for k in range(len(envs)))))
        finally:
            await driver.close()


def _tool_call(traj: Trajectory, turn: int) -> dict | None:
    """The native tool call of `turn`, if the episode has tools and that reply made one."""
    calls = traj.info.get("tool_calls")
    return calls[turn] if calls else None


def _is_reset_result(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict)


def _is_step_result(value) -> bool:
    return (isinstance(value, tuple) and len(value) == 5 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and isinstance(value[4], dict))
