"""Turn a pydantic ValidationError into one message that names each bad key and what is allowed there."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


# Keys renamed so that one name means one idea (old -> new): an old config gets told the new name.
RENAMED = {
    "algorithm.credit": "algorithm.anchor_credit", "algorithm.credit_kappa": "algorithm.anchor_kappa",
    "algorithm.credit_top_q": "algorithm.anchor_top_q", "algorithm.credit_window": "algorithm.anchor_window",
    "algorithm.credit_layer": "algorithm.anchor_layer", "algorithm.credit_positive_only": "algorithm.anchor_positive_only",
    "agent.gamma": "agent.turn_gamma",
}


def format_validation_error(err: ValidationError, root: type[BaseModel]) -> str:
    """One line per problem: an unknown key lists the keys its own section (or list item) allows,
    any other error names the key, the value given and pydantic's reason."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = section_model(root, e["loc"][:-1])
            allowed = sorted(f.alias or name for name, f in section.model_fields.items()) if section else []
            renamed = f" (renamed to {RENAMED[key]!r})" if key in RENAMED else ""
            lines.append(f"unknown key {key!r}{renamed}; allowed keys here: {allowed}")
        elif isinstance(e.get("input"), dict):  # a check across a section's keys: no need to echo the section
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(msg if not key or msg.startswith(key) else f"{key}: {msg}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key or '<root>'} = {e.get('input')!r}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def section_model(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model that holds the keys at `loc` (a pydantic error location below `root`), or None when
    `loc` does not lead to a model. An index or key into a list or dict of sections (e.g. the 0 of
    `reward.functions.0`) steps into the item's model, so its keys are the ones reported."""
    node: Any = root
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = {f.alias or name: f for name, f in node.model_fields.items()}.get(str(part))
            if field is None:
                return None
            node = _unwrap_optional(field.annotation)
        else:
            node = _unwrap_optional(_item_type(node))
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X: an optional section still has X's keys."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _item_type(annotation: Any) -> Any:
    """The type of one item of a list/tuple (indexed by position) or of a dict (indexed by key); None otherwise."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set, frozenset) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None
