"""Checks of what a config points at outside itself: the task's generator or dataset, the local model
folder, and the optional packages an engine or a tracker needs.

`rollmill.checks.check_config` runs them, so each fails as one message naming the key before any
model loads. Found later, the same mistakes surface as a traceback from inside transformers or vLLM,
or (a held-out split larger than the task) as minutes of fruitless drawing.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator

from rollmill.config import LogConfig, ModelConfig, RunConfig, TaskConfig
from rollmill.plugins import PluginError
from rollmill.tasks import BUILTIN_SOURCES, DataError, task_source
from rollmill.tasks.arithmetic import arithmetic_problems
from rollmill.track.trackers import TRACKER_PACKAGES

Problem = tuple[str, Any, str]  # (dotted key, its value, what is wrong and what is allowed)

# What `from_pretrained` reads from a model folder: (what to call it, file patterns, any one of which will do)
_MODEL_FILES = (
    ("config.json", ("config.json",)),
    ("weights (*.safetensors or pytorch_model*.bin)", ("*.safetensors", "pytorch_model*.bin")),
    ("tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model or vocab.json)",
     ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")),
)

VLLM_INSTALL = ("run `make install-vllm` and start rollmill from that environment (.venv-vllm/bin/rollmill); "
                "vLLM pins older transformers than rollmill, so it has an environment of its own")


def input_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Every problem with the task, the model folder and the engine and tracker packages `cfg` asks for."""
    if cfg.pipeline != "agentic":  # the agentic pipeline plays `env` and never reads `task`
        yield from task_problems(cfg.task)
    yield from model_problems(cfg.model)
    if cfg.rollout.engine == "vllm" and find_spec("vllm") is None:
        yield ("rollout.engine", "vllm",
               f"the vllm engine needs the package 'vllm', which is not installed here: {VLLM_INSTALL}")
    yield from tracker_problems(cfg.log)


def task_problems(task: TaskConfig) -> Iterator[Problem]:
    """An unknown generator or dataset name, or an eval split the generator cannot fill. Data files are
    checked row by row when they load, which is still before any model."""
    for i, item in enumerate(task.mix):
        yield from ((f"task.mix.{i}.{key.removeprefix('task.')}", value, message)
                    for key, value, message in task_problems(item))
    if task.mix:
        return
    if task.source == "arithmetic":
        yield from arithmetic_problems(task)
    elif task.source == "reasoning_gym":
        from rollmill.tasks.gym import check_dataset_name  # imports reasoning_gym: seconds, so only when used

        try:
            check_dataset_name(task.name)
        except DataError as err:
            yield "task.name", task.name, str(err)
    elif task.source not in BUILTIN_SOURCES:
        try:
            task_source(task.source)
        except PluginError as err:
            yield "task.source", task.source, str(err)


def model_problems(model: ModelConfig) -> Iterator[Problem]:
    """For `model.source: hf_dir`, a `model.path` that is not a transformers folder with everything it needs."""
    if model.source != "hf_dir" or model.path is None:  # a missing path is the config's own error
        return
    path = Path(model.path)
    if not path.exists():
        yield "model.path", model.path, f"model folder {_shown(path)} does not exist"
    elif not path.is_dir():
        yield "model.path", model.path, (f"{_shown(path)} is a file; model.path must be a transformers model folder "
                                         "(config.json, weights, tokenizer)")
    else:
        missing = [what for what, patterns in _MODEL_FILES if not any(any(path.glob(p)) for p in patterns)]
        if missing:
            yield "model.path", model.path, f"model folder {_shown(path)} has no {'; no '.join(missing)}"


def _shown(path: Path) -> str:
    # A relative path is read from the working directory, which the message should not leave to guesswork.
    return str(path) if path.is_absolute() else f"{path} ({path.resolve()})"


def tracker_problems(log: LogConfig) -> Iterator[Problem]:
    """A tracker in `log.trackers` whose package is not installed (else an ImportError once the model is loaded)."""
    for i, name in enumerate(log.trackers):
        modules, install = TRACKER_PACKAGES[name]
        missing = [module for module in modules if find_spec(module) is None]
        if missing:
            yield (f"log.trackers.{i}", name, f"the {name} tracker needs {', '.join(map(repr, missing))}, "
                   f"which is not installed here: {install}")
