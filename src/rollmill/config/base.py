"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_device(value: str) -> str:
    """A device name a config may give: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")
    return value
