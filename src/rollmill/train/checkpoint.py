"""Checkpoints that resume exactly: weights (safetensors), optimizer + LR schedule, RNG, loop state.

A checkpoint is written to a temporary folder and renamed into place, so a run killed mid-write
never leaves a half checkpoint that `--resume` would pick up. Weights and optimizer state are
stored whole and named by parameter (torch.distributed's full state dicts), whether one process
or N FSDP2 ranks trained them, so a run may resume on a different number of ranks. With LoRA the
policy file is the adapter alone (`adapter_model.safetensors` + `adapter_config.json`, the layout
`peft` loads); the base is the configured model, unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

PREFIX = "step_"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that are another name's tensor (tied input/output embeddings): stored once, under
    the alphabetically first name (as safetensors' `save_model` does, so either reads the other's files).
    Call it on the unsharded model: FSDP2's gathered state no longer shares storage."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        groups.setdefault((t.data_ptr(), t.shape), []).append(name)
    return {name for names in groups.values() for name in sorted(names)[1:]}


def gather_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `model`, whole and on the CPU; under FSDP2 a collective (every rank calls it) whose
    result only rank 0 gets ({} elsewhere). The tensors are copies only where gathering made them so."""
    return get_model_state_dict(model, options=_GATHER)


def gather_optimizer(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole (a collective under FSDP2, like gather_weights)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def restore_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], expected: set[str], where: str) -> None:
    """Load `state` (whole tensors by name) into `model`, sharded or not; every name in `expected` must be there
    and every name must belong to the model."""
    own = set(get_model_state_dict(model).keys())
    missing, unknown = expected - set(state), set(state) - own
    if missing or unknown:
        raise RuntimeError(f"checkpoint {where} does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unknown)[:5]}")
    set_model_state_dict(model, state, options=_SCATTER)


def restore_optimizer(model: torch.nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def write_checkpoint(ckpt_root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], blob: dict,
                     loop_state: dict, keep: int, files: dict[str, bytes] | None = None) -> Path:
    """Write checkpoint `step` under `ckpt_root`: each entry of `tensors` as a safetensors file, `blob`
    (optimizer, schedule, ...) with the RNG state as trainer.pt, `files` as they are; then prune all
    but the newest `keep`. Nothing is visible under the final name before it is complete."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({**blob, "rng": _rng_state()}, tmp / "trainer.pt")
    mode = (tmp / "trainer.pt").stat().st_mode & 0o777  # what the umask gives a new file
    for name, state in tensors.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name))
        (tmp / name).chmod(mode)  # safetensors writes 0600; a checkpoint's files should all read alike
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(trainer.pt's blob, state.json) of checkpoint `path`; restores the RNG state it holds."""
    blob = torch.load(path / "trainer.pt", weights_only=False)
    _set_rng_state(blob["rng"])
    return blob, json.loads((path / "state.json").read_text())


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_weights(path: Path, model) -> None:
    """The policy weights of checkpoint `path` into a plain (unsharded) `model` of the run's configuration;
    a LoRA checkpoint's adapter is merged in (the model then computes what the trained policy did)."""
    if (path / ADAPTER_FILE).is_file():
        from rollmill.models.lora import load_adapter_merged

        load_adapter_merged(path, model)
        return
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=True)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")


__all__ = ["ADAPTER_FILE", "MODEL_FILE", "gather_optimizer", "gather_weights", "list_checkpoints", "load_file",
           "load_weights", "read_checkpoint", "restore_optimizer", "restore_weights", "tied_names", "write_checkpoint"]
