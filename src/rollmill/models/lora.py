"""LoRA adapters on the policy (the `peft` library) and the weights the engines are sent.

The adapters are injected into the transformers model in place, so the trainer, the log-prob code
and the checkpoints keep working on the same module. Engines never see an adapter: they hold a
plain copy of the base and receive, at each weight sync, the merged weight W + (alpha / r) B A of
every adapted layer, and nothing else (the rest of the base never changes). docs/scale.md, "LoRA".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from rollmill.config import LoraConfig


def add_adapters(model: torch.nn.Module, cfg: LoraConfig):
    """Inject LoRA adapters into `model` in place and freeze everything else; returns the PeftModel
    around it (for adapter state and switching adapters off). The adapters start as the identity
    (B = 0), so the adapted model's outputs equal the base's until the first update."""
    try:
        from peft import LoraConfig as PeftLora, get_peft_model
    except ImportError:
        raise ImportError("model.lora.rank > 0 needs the peft library: pip install peft (make install does)") from None
    peft_cfg = PeftLora(r=cfg.rank, lora_alpha=cfg.alpha or 2 * cfg.rank, lora_dropout=cfg.dropout,
                        target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates; nothing for users to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """alpha / r of every adapted layer of `model`, by its transformers module name (e.g. `model.layers.0.mlp.up_proj`)."""
    from peft.tuners.lora import LoraLayer

    return {name: module.scaling["default"] for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def merged_weights(state: dict[str, torch.Tensor], scalings: dict[str, float],
                   adapted_only: bool = True) -> dict[str, torch.Tensor]:
    """From the adapted model's state dict (`base_layer` and `lora_A/B` names), the plain model's weights:
    W + (alpha / r) B A for every adapted layer, in W's dtype, under the transformers name
    (`...q_proj.weight`); with `adapted_only=False` every other weight too, renamed to match.

    Works on a gathered state (FSDP2 ranks) as on a local one; the engine of a run needs only the
    adapted layers, since it holds a copy of the frozen rest."""
    out = {}
    with torch.no_grad():
        for name, scale in scalings.items():
            base = state[f"{name}.base_layer.weight"]
            a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
            out[f"{name}.weight"] = torch.addmm(base.float(), b.float(), a.float(), alpha=scale).to(base.dtype)
        if not adapted_only:
            for name, t in state.items():
                if ".lora_" not in name:
                    out.setdefault(name.replace(".base_layer.", "."), t)
    return out


# peft's own file layout, so `PeftModel.from_pretrained(base, checkpoint_dir)` opens a checkpoint
_PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"


def adapter_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of an adapted model's state dict, under the names peft's adapter files use."""
    return {_PEFT_PREFIX + k.replace(".default.weight", ".weight"): v for k, v in state.items() if ".lora_" in k}


def adapter_model_state(file_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under the adapted model's own state-dict names (inverse of adapter_file_state)."""
    return {k.removeprefix(_PEFT_PREFIX).replace(".weight", ".default.weight"): v for k, v in file_state.items()}


def adapter_config_json(peft_model, base: str) -> bytes:
    """adapter_config.json for a checkpoint of `peft_model` whose base model is described by `base`."""
    cfg = peft_model.peft_config["default"].to_dict()
    cfg["base_model_name_or_path"] = base
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    return json.dumps(cfg, indent=1, default=str).encode()


def load_adapter_merged(path: Path, model: torch.nn.Module) -> None:
    """Merge the adapter stored in checkpoint folder `path` into the plain `model` in place:
    W += (alpha / r) B A for each adapted layer."""
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    state = adapter_model_state(load_file(str(path / "adapter_model.safetensors")))
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for key in [k for k in state if ".lora_A." in k]:
            name = key.split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            target = weights[f"{name}.weight"]
            target.copy_((target.float() + scale * (b.float() @ state[key].float())).to(target.dtype))
