"""Where a role's tensors live: the configured device name resolved on the machine the role runs on.

Resolution happens inside each role (a Ray actor on a GPU node sees that node's CUDA devices), so
`auto` means "CUDA when this process has it, else CPU" wherever the role lands.
"""

from __future__ import annotations

import torch

from rollmill.config import RunConfig


class DeviceError(RuntimeError):
    """A configured device this process does not have; the message names the setting."""


def resolve_device(name: str, setting: str = "model.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device present in this process."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{setting}={name!r} but this process sees no CUDA device (torch "
                              f"{torch.__version__}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{setting}={name!r} but this process sees {torch.cuda.device_count()} CUDA devices")
    return device


def role_device(cfg: RunConfig, role: str) -> torch.device:
    """The device of role `learner` or `rollout`: `runtime.<role>.device`, else `model.device`."""
    own = getattr(cfg.runtime, role).device
    return resolve_device(own or cfg.model.device, f"runtime.{role}.device" if own else "model.device")
