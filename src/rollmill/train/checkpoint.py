"""Checkpoints that resume exactly: weights (safetensors), optimizer + LR schedule, RNG, loop state.

A checkpoint is written to a temporary folder and renamed into place, so a run killed mid-write
never leaves a half checkpoint that `--resume` would pick up. Weights and optimizer state are
stored whole and named by parameter (torch.distributed's full state dicts), whether one process
or N FSDP2 ranks trained them, so a run may resume on a different number of ranks. With LoRA the
policy file is the adapter alone (`adapter_model.safetensors` + `adapter_config.json`, the layout
`peft` loads); the base is the configured model, unchanged.

A checkpoint folder is also a transformers model folder: the weights under transformers' names (tied
weights stored once, under the name `save_pretrained` keeps), config.json, generation_config.json and
the tokenizer's files, so `AutoModelForCausalLM.from_pretrained(checkpoint)` and
`AutoTokenizer.from_pretrained(checkpoint)` open it. A LoRA checkpoint has the tokenizer's files but no
config.json: transformers then reads the base named in adapter_config.json (docs/architecture.md).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from transformers.modeling_utils import remove_tied_weights_from_state_dict

log = logging.getLogger(__name__)

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


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """State-dict names that are another name's tensor (tied input/output embeddings), each mapped to the
    name stored for both: checkpoints store such a tensor once, under the name `save_pretrained` keeps
    (`model.embed_tokens.weight`, not `lm_head.weight`), because that is the one `from_pretrained` reads
    and ties the others to. Call it on the unsharded model: FSDP2's gathered state no longer shares storage."""
    state = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(state), model)  # what save_pretrained would write
    stored = {(t.data_ptr(), t.shape): name for name, t in state.items() if name in kept}
    return {name: stored[(t.data_ptr(), t.shape)] for name, t in state.items() if name not in kept}


def read_model_file(path: Path, tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """The weights in checkpoint `path`'s model.safetensors, each tied weight under the name `tied` maps it
    to (checkpoints from before they followed `save_pretrained` stored a tied tensor under the other name)."""
    state = load_file(str(path / MODEL_FILE))
    for name, stored in tied.items():
        if stored not in state and name in state:
            state[stored] = state.pop(name)
    return state


def folder_files(model, tokenizer, with_config: bool = True) -> dict[str, bytes]:
    """The files besides the weights that make a checkpoint folder a transformers model folder, by name:
    the tokenizer's, and with `with_config` config.json and generation_config.json (as `save_pretrained`
    writes them, the dtype being the model's). A LoRA checkpoint goes without the config: transformers takes
    a folder with config.json and adapter_config.json for a whole model with an adapter and would look for
    the base's weights in it, where without one it loads the base that adapter_config.json names."""
    with tempfile.TemporaryDirectory() as tmp:
        if with_config:
            config = copy.deepcopy(model.config)
            config.dtype = str(model.dtype).removeprefix("torch.")
            config.architectures = [type(model).__name__]
            config.save_pretrained(tmp)
            if model.can_generate():
                model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}


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
        # "format": the metadata transformers 4.x requires of a safetensors file before it loads it
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name), metadata={"format": "pt"})
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


def newest_readable(ckpt_root: Path, read: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """(checkpoint, read(checkpoint)) for the newest checkpoint under `ckpt_root` that `read` can read: an
    unreadable one is logged with its reason and the one before is tried. None when there is no checkpoint;
    RuntimeError when there are some and none can be read."""
    ckpts = list_checkpoints(ckpt_root)
    for ckpt in reversed(ckpts):
        try:
            return ckpt, read(ckpt)
        except Exception as err:  # noqa: BLE001 - any unreadable file: the reason is logged, the run goes on
            log.warning("checkpoint %s cannot be read (%s: %s); trying the one before", ckpt, type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "")
    if ckpts:
        raise RuntimeError(f"no checkpoint under {ckpt_root} can be read (see the warnings above)")
    return None


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


__all__ = ["ADAPTER_FILE", "MODEL_FILE", "folder_files", "gather_optimizer", "gather_weights", "list_checkpoints",
           "load_file", "load_weights", "read_checkpoint", "read_model_file", "restore_optimizer", "restore_weights",
           "tied_names", "write_checkpoint"]
