"""Local task files (.jsonl, .json, .parquet), validated row by row before anything uses them.

Errors name the file, the row and the field. Rows are named "line N" (1-based) for JSONL and for
JSON syntax errors, and "row index N" (0-based) for JSON arrays and Parquet.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, NamedTuple

from rollmill.config import TaskConfig
from rollmill.tasks import DataError, Example, with_instruction

SUPPORTED = (".jsonl", ".json", ".parquet")


class Row(NamedTuple):
    index: int  # 0-based position among the file's records
    where: str  # "line 7" or "row index 6", for messages
    prompt: str
    answer: str


def _answer_text(value: str | int | float) -> str:
    # Integral floats ("3.0") would never match an integer reward; they come from JSON/Parquet
    # writers that store every number as float.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check(record: Any, index: int, where: str, path: Path, cfg: TaskConfig) -> Row:
    if not isinstance(record, dict):
        got = type(record).__name__
        raise DataError(f"{path}: {where}: expected an object with field {cfg.prompt_field!r}, got {got}")
    for name in (cfg.prompt_field, cfg.answer_field):
        if name not in record:
            raise DataError(f"{path}: {where}: missing field {name!r} (fields: {sorted(record)})")
    prompt, answer = record[cfg.prompt_field], record[cfg.answer_field]
    if not isinstance(prompt, str):
        raise DataError(f"{path}: {where}: field {cfg.prompt_field!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{path}: {where}: field {cfg.prompt_field!r} is empty")
    # bool is an int subclass, but True as a reference answer is a data bug, not the number 1.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(
            f"{path}: {where}: field {cfg.answer_field!r} must be a string or a number, got {type(answer).__name__}"
        )
    if not str(answer).strip():
        raise DataError(f"{path}: {where}: field {cfg.answer_field!r} is empty")
    return Row(index, where, prompt, _answer_text(answer))


def _read_jsonl(path: Path, cfg: TaskConfig) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            rows.append(_check(record, len(rows), f"line {lineno}", path, cfg))
    return rows


def _read_json(path: Path, cfg: TaskConfig) -> list[Row]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: line 1: expected a JSON array of objects, got {type(records).__name__}")
    return [_check(r, i, f"row index {i}", path, cfg) for i, r in enumerate(records)]


def _read_parquet(path: Path, cfg: TaskConfig) -> list[Row]:
    # No network: the parquet builder ships with `datasets`, nothing needs fetching.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # pyarrow raises many types for a corrupt file; all mean "unreadable"
        raise DataError(f"{path}: cannot read as Parquet: {type(err).__name__}: {err}") from None
    for name in (cfg.prompt_field, cfg.answer_field):
        if name not in table.column_names:
            raise DataError(f"{path}: row index 0: missing field {name!r} (columns: {table.column_names})")
    prompts, answers = table[cfg.prompt_field], table[cfg.answer_field]
    return [
        _check({cfg.prompt_field: p, cfg.answer_field: a}, i, f"row index {i}", path, cfg)
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]


def read_rows(path_text: str, cfg: TaskConfig) -> list[Row]:
    """Every row of one task file, validated; raises DataError on the first bad row."""
    path = Path(path_text)
    if path.suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; allowed: {list(SUPPORTED)}")
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    rows = readers[path.suffix](path, cfg)
    if not rows:
        raise DataError(f"{path}: has no rows")
    return rows


def _examples(rows: list[Row], path: Path, split: str, cfg: TaskConfig) -> list[Example]:
    return [
        Example(
            id=f"{path.stem}/{split}/{r.index}",
            prompt=with_instruction(r.prompt, cfg.instruction),
            answer=r.answer,
            meta={"file": str(path), "row": r.where},
        )
        for r in rows
    ]


def load_files(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) from `cfg.path`; eval is all of `cfg.eval_path`, else `cfg.eval_size` held-out rows."""
    rows = read_rows(cfg.path, cfg)
    if cfg.eval_path:
        eval_rows = read_rows(cfg.eval_path, cfg)
        rest = rows
    else:
        if len(rows) <= cfg.eval_size:
            raise DataError(
                f"{cfg.path}: has {len(rows)} rows, needs more than task.eval_size={cfg.eval_size} to hold out "
                "an eval split; lower task.eval_size or set task.eval_path"
            )
        picked = set(random.Random(f"{cfg.seed}/eval").sample(range(len(rows)), cfg.eval_size))
        eval_rows = [r for r in rows if r.index in picked]
        rest = [r for r in rows if r.index not in picked]
    # Duplicate prompts in a file would otherwise leak eval prompts into train.
    held_out = {r.prompt for r in eval_rows}
    train_rows = [r for r in rest if r.prompt not in held_out][: cfg.train_size]
    if not train_rows:
        raise DataError(f"{cfg.path}: no train rows left after holding out the eval prompts")
    eval_file = Path(cfg.eval_path or cfg.path)
    return _examples(train_rows, Path(cfg.path), "train", cfg), _examples(eval_rows, eval_file, "eval", cfg)
