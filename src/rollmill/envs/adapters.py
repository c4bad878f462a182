"""Adapters for outside env libraries: gymnasium (Discrete actions, ANSI rendering) and GEM.

Both libraries are optional; they are imported only when an adapter is built.
"""

from __future__ import annotations

import re
import string
from typing import Any

from rollmill.envs.base import register_env

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@register_env("gymnasium", "a gymnasium env with Discrete actions, shown through its ANSI rendering")
class GymnasiumTextEnv:
    """A gymnasium env made with render_mode="ansi": observations are `env.render()` text (or str(obs)).

    An action is one of `action_names` (case-insensitive) or an action index 0..n-1. info state is
    the repr of gymnasium's observation, so equal env states hash equal.
    """

    def __init__(self, env_id: str, action_names: list[str] | None = None, **make_kwargs: Any):
        try:
            import gymnasium
        except ImportError as err:
            raise ImportError("the gymnasium adapter needs gymnasium: pip install gymnasium") from err
        self.env = gymnasium.make(env_id, render_mode="ansi", **make_kwargs)
        space = self.env.action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            self.env.close()
            raise ValueError(f"gymnasium env {env_id!r} has action space {space}; only Discrete is supported")
        self.num_actions, self.first_action = int(space.n), int(space.start)
        self.action_names = [name.lower() for name in action_names] if action_names else []
        if self.action_names and len(self.action_names) != self.num_actions:
            self.env.close()
            raise ValueError(f"{env_id} has {self.num_actions} actions but {len(self.action_names)} action_names")
        names = ", ".join(self.action_names) + " or an index" if self.action_names else "an index"
        self.legal = f"{names} from 0 to {self.num_actions - 1}"
        self.instructions = (
            f"You are playing the gymnasium environment {env_id}, shown as text. Reply with one action: {self.legal}."
        )
        self.text, self.state = "", ""

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed)
        self._observe(obs)
        return self.text, {**info, "state": self.state}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        index = self._parse(action)
        if index is None:
            note = f"Invalid action: reply with {self.legal}."
            return f"{self.text}\n{note}", 0.0, False, False, {"state": self.state, "invalid_action": True}
        obs, reward, terminated, truncated, info = self.env.step(self.first_action + index)
        self._observe(obs)
        info = {**info, "state": self.state, "invalid_action": False}
        info.setdefault("success", bool(info.get("is_success", terminated and reward > 0)))
        return self.text, float(reward), bool(terminated), bool(truncated), info

    def _parse(self, action: str) -> int | None:
        word = action.strip().strip(string.punctuation + string.whitespace).lower()
        if word in self.action_names:
            return self.action_names.index(word)
        if word.isdigit() and int(word) < self.num_actions:
            return int(word)
        return None

    def _observe(self, obs: Any) -> None:
        rendered = self.env.render()
        if isinstance(rendered, str):  # ANSI renderings colour the agent's cell: escapes mean nothing to a model
            rendered = ANSI_ESCAPE.sub("", rendered)
        self.text = rendered.strip("\n") if isinstance(rendered, str) and rendered.strip() else str(obs)
        self.state = repr(obs.tolist() if hasattr(obs, "tolist") else obs)

    def close(self) -> None:
        self.env.close()


@register_env("gem", "an env from GEM (pip install gem-llm), which already speaks text")
class GemEnv:
    """A GEM env (`gem.make(env_id, **kwargs)`); GEM's task text arrives in the observations.

    Observations, rewards and info pass through; `success` is added at termination as reward > 0
    when GEM's info does not have it.
    """

    instructions = "Follow the task described in the messages and reply in the format it asks for."

    def __init__(self, env_id: str, **kwargs: Any):
        try:
            import gem
        except ImportError as err:
            raise ImportError("the gem adapter needs GEM: pip install gem-llm") from err
        self.env = gem.make(env_id, **kwargs)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed)
        return obs, dict(info or {})

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info or {})
        if terminated:
            info.setdefault("success", reward > 0)
        return obs, float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
