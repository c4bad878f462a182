"""The multi-turn agent loop: many episodes advance together, one engine batch per turn.

At each turn every live episode's context goes to the engine in one `generate` call; replies are
appended as sampled tokens, actions parsed and sent to the envs (concurrently, with a timeout),
and episodes that end leave the batch. An env that raises or hangs fails only its own episode.
"""

from __future__ import annotations

from dataclasses import replace

from rollmill.agent.chat import ChatFormat, PlainFormat, format_instruction, parse_action, stop_strings
from rollmill.agent.env_calls import CallResult, call_all
from rollmill.agent.trajectory import Row, Trajectory, Turn
from rollmill.config import AgentConfig
from rollmill.envs import Env
from rollmill.rollout import SamplingParams
from rollmill.rollout.engine import Request
from rollmill.rollout.sampling import request_seed

OMITTED = "(observation omitted)"


class AgentLoop:
    """Plays batches of episodes with one engine; owns chat formatting, parsing and the context policy."""

    def __init__(self, engine, tokenizer, cfg: AgentConfig, sampling: SamplingParams, step_timeout_s: float = 30.0):
        self.engine = engine
        self.chat = ChatFormat(tokenizer) if cfg.chat_template else PlainFormat(tokenizer)
        self.cfg = cfg
        self.sampling = replace(sampling, n=1, stop=tuple(sampling.stop) + stop_strings(cfg.action_format, cfg.action_tag))
        self.timeout = step_timeout_s
        self.format_line = format_instruction(cfg.action_format, cfg.action_tag)

    def system_prompt(self, env: Env) -> str:
        """The env's instructions (or the configured prompt) and the action-format line; may be empty."""
        text = env.instructions if self.cfg.system_prompt is None else self.cfg.system_prompt
        lines = [text] + ([self.format_line] if self.cfg.format_hint else [])
        return "\n".join(line for line in lines if line)

    def play(self, envs: list[Env], seeds: list[int], group_ids: list[int], sample_seeds: list[int],
             env_name: str = "") -> list[Trajectory]:
        """One episode per env (reset with its seed); returns them in the same order. Turn t of episode
        i samples with seed `request_seed(sample_seeds[i], t)`."""
        resets = call_all([(env.reset, (s,)) for env, s in zip(envs, seeds)], self.timeout)
        trajs = [self._start(env, s, g, r, env_name) for env, s, g, r in zip(envs, seeds, group_ids, resets)]
        for turn in range(self.cfg.max_turns):
            running = [i for i, t in enumerate(trajs) if t.end_reason == "running"]
            live = [i for i in running if self._prepare_context(trajs[i], turn)]
            if not live:
                break
            completions = self.engine.run([Request(tuple(trajs[i].rows[-1].context), self.sampling,
                                                   request_seed(sample_seeds[i], turn)) for i in live])
            actions = [parse_action(c.text, self.cfg.action_format, self.cfg.action_tag) for c in completions]
            for i, c in zip(live, completions):
                trajs[i].rows[-1].append(c.token_ids, c.logprobs, turn)
            to_step = [(i, a) for i, a in zip(live, actions) if a is not None]
            results = dict(zip([i for i, _ in to_step], call_all([(envs[i].step, (a,)) for i, a in to_step], self.timeout)))
            for i, c, action in zip(live, completions, actions):
                self._record(trajs[i], c, action, results.get(i), turn)
        for t in trajs:
            if t.end_reason == "running":
                t.truncated, t.end_reason = True, "max_turns"
        return trajs

    def _start(self, env: Env, seed: int, group: int, reset: CallResult, env_name: str) -> Trajectory:
        traj = Trajectory(env_name, seed, group, rows=[], initial_observation="", policy_version=self.engine.version)
        if not reset.ok or not _is_reset_result(reset.value):
            self._fail(traj, reset, "reset")
            return traj
        obs, info = reset.value
        traj.initial_observation, traj.initial_state, traj.initial_progress = obs, info.get("state"), info.get("progress")
        traj.info["state"] = traj.initial_state
        traj.info["system"] = self.system_prompt(env)
        traj.rows.append(Row(self.chat.prompt(self._messages(traj, turn=0))))
        return traj

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
            messages.append({"role": "assistant", "content": t.reply})
            messages.append({"role": "user", "content": OMITTED if omit else t.observation})
        return messages

    def _prepare_context(self, traj: Trajectory, turn: int) -> bool:
        """Extend (or, when the context policy drops history, restart) the episode's row; False if it no longer fits."""
        if turn > 0:
            drops_from = {"keep_all": None, "sliding_window": 1, "truncate_observations": 2}[self.cfg.context]
            rewrites = drops_from is not None and turn >= self.cfg.window_turns + drops_from
            if rewrites:
                traj.rows.append(Row(self.chat.prompt(self._messages(traj, turn))))
            else:
                row = traj.rows[-1]  # it ends with the previous reply: observations are appended only here
                row.append(self.chat.observation(traj.turns[-1].observation, row.token_ids[-1:]))
        if len(traj.rows[-1].context) + self.sampling.max_new_tokens > self.cfg.max_context_tokens:
            traj.truncated, traj.end_reason = True, "context"
            return False
        return True

    def _record(self, traj: Trajectory, completion, action: str | None, result: CallResult | None, turn: int) -> None:
        state_before = traj.info.get("state")
        if action is None:
            traj.turns.append(Turn(completion.text, None, f"Invalid action. {self.format_line}", self.cfg.invalid_action_penalty,
                                   state_before, None, True, len(traj.rows) - 1, completion.finish_reason))
            return
        if not result.ok or not _is_step_result(result.value):
            traj.turns.append(Turn(completion.text, action, "", 0.0, state_before, None, False, len(traj.rows) - 1,
                                   completion.finish_reason))
            self._fail(traj, result, f"step {turn}")
            return
        obs, reward, terminated, truncated, info = result.value
        invalid = bool(info.get("invalid_action", False))
        reward = float(reward) + (self.cfg.invalid_action_penalty if invalid else 0.0)
        traj.turns.append(Turn(completion.text, action, obs, reward, state_before, info.get("progress"), invalid,
                               len(traj.rows) - 1, completion.finish_reason))
        traj.info["state"] = info.get("state", state_before)
        if terminated or truncated:
            traj.terminated, traj.truncated = bool(terminated), bool(truncated) and not terminated
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


def _is_reset_result(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict)


def _is_step_result(value) -> bool:
    return (isinstance(value, tuple) and len(value) == 5 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and isinstance(value[4], dict))
