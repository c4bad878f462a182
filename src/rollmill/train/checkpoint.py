"""Checkpoints that resume exactly: weights (safetensors), optimizer + LR schedule, RNG, loop state.

A checkpoint is written to a temporary folder and renamed into place, so a run killed mid-write
never leaves a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

PREFIX = "step_"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(ckpt_root: Path, step: int, model, trainer, loop_state: dict, keep: int, critic=None,
                    files: dict[str, bytes] | None = None) -> Path:
    """Write checkpoint `step` under `ckpt_root` and prune all but the newest `keep` (with the critic, if
    any, and `files`: other roles' state, written before the checkpoint becomes visible)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    blob = {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(), "rng": _rng_state()}
    if critic is not None:
        save_model(critic.model, str(tmp / "critic.safetensors"))
        blob["critic_optimizer"] = critic.optimizer.state_dict()
    torch.save(blob, tmp / "trainer.pt")
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_weights(path: Path, model) -> None:
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(path: Path, model, trainer, critic=None) -> dict:
    """Restore weights, optimizer, schedule, RNG (and the critic) from `path`; return the loop state."""
    load_weights(path, model)
    blob = torch.load(path / "trainer.pt", weights_only=False)
    if critic is not None:
        load_model(critic.model, str(path / "critic.safetensors"), strict=True)
        critic.optimizer.load_state_dict(blob["critic_optimizer"])
    trainer.optimizer.load_state_dict(blob["optimizer"])
    trainer.scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())
