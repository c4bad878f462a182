"""User code named in a config: rewards, envs and task sources outside the package.

A name in `reward.functions[].name`, `env.name` or `task.source` is looked up in three places, in
order: rollmill's own registry; Python entry points an installed package declares (groups
`rollmill.rewards`, `rollmill.envs`, `rollmill.tasks`); and a reference to an object,
`package.module:attr` (importable) or `path/to/file.py:attr` (a file, relative to the working
directory). So a project keeps its reward in its own file and names it in YAML; no launcher script
has to edit a registry first.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

GROUPS = {"reward function": "rollmill.rewards", "env": "rollmill.envs", "task source": "rollmill.tasks"}


class PluginError(ValueError):
    """A name that resolves to nothing: the message says what was tried and what exists."""


def is_reference(name: str) -> bool:
    """`module:attr` or `file.py:attr` rather than a registered name."""
    return ":" in name


def installed(what: str) -> dict[str, str]:
    """Entry points of group `what` ("reward function", "env", "task source"): name -> "module:attr"."""
    return {ep.name: ep.value for ep in entry_points(group=GROUPS[what])}


def resolve(name: str, registry: dict[str, Any], what: str) -> Any:
    """The object `name` stands for: registry entry, entry point, or `module:attr` / `file.py:attr`."""
    if name in registry:
        return registry[name]
    plugins = {ep.name: ep for ep in entry_points(group=GROUPS[what])}
    if name in plugins:
        return _load_entry_point(plugins[name], what)
    if is_reference(name):
        return load_reference(name, what)
    known = sorted(registry) + sorted(plugins)
    raise PluginError(f"unknown {what} {name!r}; allowed: {known}, or your own as 'package.module:attr' "
                      f"or 'path/to/file.py:attr'")


def load_reference(ref: str, what: str) -> Any:
    """Import `ref` ('package.module:attr' or 'path/to/file.py:attr') and return the attribute."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise PluginError(f"{what} {ref!r}: write 'package.module:attr' or 'path/to/file.py:attr'")
    module = _load_file(target, what) if target.endswith(".py") else _import(target, what)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what} {ref!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PluginError(f"{what} module {module!r} cannot be imported: {err} (is it on PYTHONPATH, "
                          f"or did you mean a file, 'path/to/{module.replace('.', '/')}.py:attr'?)") from None


@functools.lru_cache(maxsize=None)
def _load_file(path: str, what: str) -> Any:
    """Import a .py file once per process under a stable private module name (so pickling by Ray
    workers and repeated lookups find the same module)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise PluginError(f"{what} file {path!r} does not exist (looked at {file})")
    name = f"rollmill_user_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"{what} file {path!r} failed to import: {type(err).__name__}: {err}") from err
    return module


def _load_entry_point(ep, what: str) -> Any:
    try:
        return ep.load()
    except Exception as err:
        raise PluginError(f"{what} {ep.name!r} (entry point {ep.value!r}) failed to load: "
                          f"{type(err).__name__}: {err}") from err
