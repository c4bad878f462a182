"""The config checks that need a registry: algorithm names and loss parameters, reward functions, envs;
and, through `rollmill.input_checks`, the task, model folder and engine package a config points at.

`rollmill.config` knows no registry (the env registry imports the config, so the config importing it
back would be a cycle); this module sits above both. `load_run_config` is `load_config` plus these
checks, and `rollmill.runtime` runs them again, so a bad name fails before any model loads.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterator

from rollmill.algos import (ADVANTAGE_NAMES, GREEDY_BASELINE_ADVANTAGES, GROUP_BASELINE_ADVANTAGES, KL_ESTIMATORS,
                            LOSS_AGGREGATIONS, POLICY_LOSSES, TOKEN_ADVANTAGES)
from rollmill.algos.losses import loss_param_names
from rollmill.config import AlgorithmConfig, ConfigError, EnvConfig, RewardConfig, RunConfig, load_config
from rollmill.envs import check_env_kwargs
from rollmill.input_checks import Problem, input_problems
from rollmill.plugins import PluginError
from rollmill.rewards import reward_function, takes_batch

# algorithm field -> (its registry, what to call it in errors)
_ALGO_REGISTRIES = {
    "advantage": (ADVANTAGE_NAMES, "advantage estimator"),
    "loss": (POLICY_LOSSES, "policy loss"),
    "loss_agg": (LOSS_AGGREGATIONS, "loss aggregation"),
    "value_loss_agg": (LOSS_AGGREGATIONS, "loss aggregation"),
    "kl_estimator": (KL_ESTIMATORS, "KL estimator"),
}


def check_config(cfg: RunConfig) -> RunConfig:
    """Return `cfg` if every registry name in it exists and takes the arguments given, else raise
    ConfigError listing every problem, each naming the key, its value and what is allowed."""
    problems = [*_algorithm_problems(cfg.algorithm), *_reward_problems(cfg.reward), *_env_problems(cfg.env),
                *_data_parallel_problems(cfg), *_signal_problems(cfg), *_rlvr_only_problems(cfg),
                *input_problems(cfg)]
    if problems:
        # the shape of load_config's errors, so both read the same
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{key} = {value!r}: {msg}" for key, value, msg in problems))
    return cfg


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """`load_config` (YAML, overrides, validation) followed by `check_config`."""
    return check_config(load_config(path, overrides))


def _signal_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Settings under which the update can never move the policy."""
    if cfg.pipeline in ("sft", "distill"):  # no advantages: one sample per prompt is an ordinary setting there
        return
    algo = cfg.algorithm
    group_baseline = algo.advantage in GROUP_BASELINE_ADVANTAGES or (algo.advantage == "normalized"
                                                                      and algo.norm_mean == "group")
    if cfg.rollout.group_size == 1 and group_baseline:
        yield ("rollout.group_size", 1, f"advantage {algo.advantage!r} subtracts the group's own mean, so with one "
               "sample per group every advantage is 0 (no learning signal): use group_size >= 2, or an estimator "
               "with a batch baseline (batch, reinforce_pp)")
    if cfg.rollout.group_size == 1 and cfg.reward.normalize_each:
        yield ("reward.normalize_each", True, "normalizes each reward within the prompt's group, so with one sample "
               "per group every score is 0 (no learning signal): use rollout.group_size >= 2")


def _rlvr_only_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Settings the agentic pipeline has nothing for: a greedy baseline sample, token rewards, reward functions."""
    if cfg.pipeline != "agentic":
        return
    advantage, rlvr_only = cfg.algorithm.advantage, {*GREEDY_BASELINE_ADVANTAGES, *TOKEN_ADVANTAGES, "gae"}
    if advantage in rlvr_only - {"gae"}:  # gae is refused by the config itself
        yield ("algorithm.advantage", advantage, "pipeline 'agentic' has no greedy baseline sample or token "
               f"returns; allowed: {sorted(set(ADVANTAGE_NAMES) - rlvr_only)}")
    if cfg.reward.normalize_each:
        yield "reward.normalize_each", True, "pipeline 'agentic' takes its rewards from the env, not reward.functions"


def _data_parallel_problems(cfg: RunConfig) -> Iterator[Problem]:
    """What a data-parallel learner (runtime.learner.ranks > 1) cannot run yet."""
    ranks = cfg.runtime.learner.ranks
    if ranks == 1:
        return
    if cfg.runtime.backend != "ray":
        yield "runtime.learner.ranks", ranks, "data-parallel ranks are Ray actors: set runtime.backend to 'ray'"
    if cfg.runtime.streamed_training:
        yield "runtime.streamed_training", True, "a streamed update is one process's: turn it off with ranks > 1"


def _algorithm_problems(algo: AlgorithmConfig) -> Iterator[Problem]:
    for field, (registry, what) in _ALGO_REGISTRIES.items():
        value = getattr(algo, field)
        if value not in registry:
            yield f"algorithm.{field}", value, f"unknown {what} {value!r}; allowed: {sorted(registry)}"
    if algo.loss not in POLICY_LOSSES:
        return
    # A loss parameter changed from its default but not taken by the selected loss would silently do nothing.
    fields = type(algo).model_fields
    used = set(loss_param_names(POLICY_LOSSES[algo.loss]))
    every = {name for fn in POLICY_LOSSES.values() for name in loss_param_names(fn)} & set(fields)
    ignored = sorted(n for n in every - used if getattr(algo, n) != fields[n].default)
    if ignored:
        yield "algorithm.loss", algo.loss, f"loss {algo.loss!r} does not use {ignored}; it takes {sorted(used)}"


def _reward_problems(reward: RewardConfig) -> Iterator[Problem]:
    for i, fn in enumerate(reward.functions):
        try:
            function = reward_function(fn.name)
        except PluginError as err:
            yield f"reward.functions.{i}.name", fn.name, str(err)
            continue
        if not callable(function):
            yield f"reward.functions.{i}.name", fn.name, f"{fn.name!r} is a {type(function).__name__}, not a function"
            continue
        params = inspect.signature(function).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        fixed = {"prompts", "completions"} if takes_batch(function) else set(list(params)[:2])  # (completion, example)
        allowed = [p for p in params if p not in fixed]
        unknown = sorted(set(fn.kwargs) - set(allowed))
        if unknown:
            yield (f"reward.functions.{i}.kwargs", fn.kwargs,
                   f"reward {fn.name!r} takes no argument {unknown}; allowed: {allowed}")


def _env_problems(env: EnvConfig) -> Iterator[Problem]:
    try:
        check_env_kwargs(env.name, env.kwargs)
    except PluginError as err:
        yield "env.name", env.name, str(err)
    except ValueError as err:
        yield "env.kwargs", env.kwargs, str(err)
