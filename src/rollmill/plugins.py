"""User code named in a config: rewards, envs and task sources outside the package.

A name in `reward.functions[].name`, `env.name` or `task.source` is looked up in three places, in
order: rollmill's own registry; a reference to an object (a name with a colon),
`package.module:attr` (importable) or `path/to/file.py:attr` (a file, relative to the working
directory); and Python entry points an installed package declares (groups `rollmill.rewards`,
`rollmill.envs`, `rollmill.tasks`). So a project keeps its reward in its own file and names it in YAML; no launcher script
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
_LOADED: dict[tuple[str, str], Any] = {}  # (group, entry point name) -> the object it loaded


class PluginError(ValueError):
    """A name that resolves to nothing: the message says what was tried and what exists."""


def is_reference(name: str) -> bool:
    """`module:attr` or `file.py:attr` rather than a registered name."""
    return ":" in name


def installed(what: str) -> dict[str, str]:
    """Entry points of group `what` ("reward function", "env", "task source"): name -> "module:attr"."""
    return {ep.name: ep.value for ep in entry_points(group=GROUPS[what])}


def resolve(name: str, registry: dict[str, Any], what: str) -> Any:
    """The object `name` stands for: registry entry, `module:attr` / `file.py:attr`, or entry point."""
    if name in registry:
        return registry[name]
    if is_reference(name):
        return load_reference(name, what)
    key = (GROUPS[what], name)
    if key not in _LOADED:  # scanning installed packages' metadata takes ms: once per name, not per sample
        plugins = {ep.name: ep for ep in entry_points(group=GROUPS[what])}
        if name not in plugins:
            known = sorted(registry) + sorted(plugins)
            raise PluginError(f"unknown {what} {name!r}; allowed: {known}, or your own as 'package.module:attr' "
                              f"or 'path/to/file.py:attr'")
        _LOADED[key] = _load_entry_point(plugins[name], what)
    return _LOADED[key]


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


def _load_file(path: str, what: str) -> Any:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise PluginError(f"{what} file {path!r} does not exist (looked at {file})")
    return _import_file(file, what)


@functools.lru_cache(maxsize=None)
def _import_file(file: Path, what: str) -> Any:
    """Import a .py file once per process (keyed by its absolute path, so the same relative name
    from another working directory is another file) under a stable private module name, so
    repeated lookups and Ray workers unpickling its functions find the same module."""
    name = f"rollmill_user_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"{what} file {str(file)!r} failed to import: {type(err).__name__}: {err}") from err
    return module


def _load_entry_point(ep, what: str) -> Any:
    try:
        return ep.load()
    except Exception as err:
        raise PluginError(f"{what} {ep.name!r} (entry point {ep.value!r}) failed to load: "
                          f"{type(err).__name__}: {err}") from err
