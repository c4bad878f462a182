"""Text environments for multi-turn agents: the Env protocol, the registry and the built-in envs.

Importing this package registers every built-in env, so `make_env(name, **kwargs)` finds them.
"""

from rollmill.envs.base import ENVS, Env, EnvSpec, check_env_kwargs, make_env, register_env
from rollmill.envs import adapters, calculator, frozenlake, guess, harness, latency, sokoban, task_env, terminal  # noqa: F401  (register)

__all__ = ["ENVS", "Env", "EnvSpec", "check_env_kwargs", "make_env", "register_env"]
