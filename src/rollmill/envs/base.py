"""The environment protocol (GEM / gymnasium shape, text in and out) and the env registry.

An env is anything with `reset(seed) -> (observation, info)` and
`step(action) -> (observation, reward, terminated, truncated, info)`, where observation and action
are strings. The agent loop reads a few optional keys from `info`:

- `state`: a hashable description of the env state (GiGPO groups steps taken from equal states);
  reported by `reset` for the initial state and by `step` for the state after the action.
- `success`: whether the episode reached its goal (success-rate metrics).
- `invalid_action`: the action text was not a legal action; the state did not change.
- `progress`: a number in [0, 1] estimating how close the episode is to success after this
  step (TurningPoint credit); `reset` reports the initial value.

`instructions` is the text the agent puts in its system prompt: what the task is and how to write
an action. Envs that hold resources define `close()`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from rollmill.plugins import PluginError, resolve


@runtime_checkable
class Env(Protocol):
    instructions: str

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]: ...


@dataclass(frozen=True)
class EnvSpec:
    name: str
    factory: Callable[..., Env]
    description: str

    def parameters(self) -> list[str]:
        """The factory's keyword names, `**name` for one that takes any further keyword."""
        return [f"**{p.name}" if p.kind is inspect.Parameter.VAR_KEYWORD else p.name
                for p in inspect.signature(self.factory).parameters.values()]


ENVS: dict[str, EnvSpec] = {}


def register_env(name: str, description: str):
    """Class or function decorator: `make_env(name, **kwargs)` will call it with the kwargs."""

    def wrap(factory):
        if name in ENVS:
            raise ValueError(f"env {name!r} is already registered")
        ENVS[name] = EnvSpec(name, factory, description)
        return factory

    return wrap


def env_spec(name: str, /) -> EnvSpec:
    """The env `name` stands for: registered, an entry point (`rollmill.envs`) or `module:attr` /
    `file.py:attr` naming a class or factory (rollmill.plugins). Raises ValueError listing the envs."""
    found = resolve(name, ENVS, "env")
    if isinstance(found, EnvSpec):
        return found
    if not callable(found):
        raise PluginError(f"env {name!r} is a {type(found).__name__}, not a class or function")
    return EnvSpec(name, found, _first_line(found.__doc__))


def check_env_kwargs(name: str, kwargs: dict[str, Any], /) -> None:
    """Raise ValueError naming the env or keyword that does not exist (PluginError, a ValueError, for
    an env that resolves to nothing); used by config validation."""
    params = inspect.signature(env_spec(name).factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"env {name!r} takes no argument {unknown}; allowed: {list(params)}")


def make_env(name: str, /, **kwargs: Any) -> Env:
    """A new env instance (positional `name`, so an env may take a `name` kwarg)."""
    check_env_kwargs(name, kwargs)
    return env_spec(name).factory(**kwargs)


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())
