"""Local task data (.jsonl, .json, .parquet files, or a `datasets` folder written by
`save_to_disk`), validated row by row before anything uses them.

A prompt is a string (the user message) or a chat: a list of {"role", "content"} messages ending
with a user message, optionally opening with a system message. Every column besides the prompt and
the answer is kept in `Example.meta`, so rewards receive it and samples show it. Errors name the
file, the row and the field. Rows are named "line N" (1-based) for JSONL and for JSON syntax
errors, and "row index N" (0-based) for JSON arrays, Parquet and dataset folders.
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
ROLES = ("system", "user", "assistant", "tool")


class Row(NamedTuple):
    index: int  # 0-based position among the file's records
    where: str  # "line 7" or "row index 6", for messages
    prompt: str  # the text (the last user message, for a chat)
    answer: str
    messages: tuple | None  # the chat, when the prompt is one
    columns: dict  # every other field


def _answer_text(value: str | int | float) -> str:
    # Integral floats ("3.0") would never match an integer reward; they come from JSON/Parquet
    # writers that store every number as float.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check(record: Any, index: int, where: str, path: Path | str, cfg: TaskConfig) -> Row:
    if not isinstance(record, dict):
        got = type(record).__name__
        raise DataError(f"{path}: {where}: expected an object with field {cfg.prompt_field!r}, got {got}")
    for name in (cfg.prompt_field, cfg.answer_field):
        if name not in record:
            raise DataError(f"{path}: {where}: missing field {name!r} (fields: {sorted(record)})")
    prompt, answer = record[cfg.prompt_field], record[cfg.answer_field]
    messages = _chat(prompt, f"{path}: {where}: field {cfg.prompt_field!r}") if isinstance(prompt, list) else None
    if messages is not None:
        prompt = messages[-1]["content"]
    elif not isinstance(prompt, str):
        raise DataError(f"{path}: {where}: field {cfg.prompt_field!r} must be a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{path}: {where}: field {cfg.prompt_field!r} is empty")
    # bool is an int subclass, but True as a reference answer is a data bug, not the number 1.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(
            f"{path}: {where}: field {cfg.answer_field!r} must be a string or a number, got {type(answer).__name__}"
        )
    if not str(answer).strip():
        raise DataError(f"{path}: {where}: field {cfg.answer_field!r} is empty")
    columns = {k: v for k, v in record.items() if k not in (cfg.prompt_field, cfg.answer_field)}
    return Row(index, where, prompt, _answer_text(answer), messages, columns)


def _chat(messages: list, where: str) -> tuple:
    """A chat prompt, checked: messages with a known role and text content, the last one the user's."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {list(ROLES)}, 'content': text}}, got {m!r}")
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: a chat prompt must end with a user message")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


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


def read_json_array(path: Path) -> list:
    """The records of a .json file holding one array; DataError naming the line otherwise."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: line 1: expected a JSON array of objects, got {type(records).__name__}")
    return records


def _read_json(path: Path, cfg: TaskConfig) -> list[Row]:
    return [_check(r, i, f"row index {i}", path, cfg) for i, r in enumerate(read_json_array(path))]


def _read_parquet(path: Path, cfg: TaskConfig) -> list[Row]:
    # No network: the parquet builder ships with `datasets`, nothing needs fetching.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # pyarrow raises many types for a corrupt file; all mean "unreadable"
        raise DataError(f"{path}: cannot read as Parquet: {type(err).__name__}: {err}") from None
    return table_rows(table, path, cfg)


def _read_dataset_folder(path: Path, cfg: TaskConfig, split: str) -> list[Row]:
    """A folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict (its `split`)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk: {type(err).__name__}: {err}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: the dataset has no split {split!r} (splits: {sorted(data)})")
        data = data[split]
    return table_rows(data, path, cfg)


def table_rows(table, path: Path | str, cfg: TaskConfig) -> list[Row]:
    """Every row of a `datasets` table, validated; `path` names it in errors."""
    for name in (cfg.prompt_field, cfg.answer_field):
        if name not in table.column_names:
            raise DataError(f"{path}: row index 0: missing field {name!r} (columns: {table.column_names})")
    return [_check(record, i, f"row index {i}", path, cfg) for i, record in enumerate(table)]


def read_rows(path_text: str, cfg: TaskConfig, split: str = "train") -> list[Row]:
    """Every row of one task file or dataset folder (its `split`), validated; raises DataError on
    the first bad row."""
    path = Path(path_text)
    if path.is_dir():
        rows = _read_dataset_folder(path, cfg, split)
        if not rows:
            raise DataError(f"{path}: has no rows")
        return rows
    if path.suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; allowed: {list(SUPPORTED)}")
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    rows = readers[path.suffix](path, cfg)
    if not rows:
        raise DataError(f"{path}: has no rows")
    return rows


def to_examples(rows: list[Row], name: str, split: str, origin: dict, cfg: TaskConfig) -> list[Example]:
    """Examples with ids `name/split/index`, the instruction applied, and `origin` (where the rows came
    from) added to each meta."""
    return [
        Example(
            id=f"{name}/{split}/{r.index}",
            prompt=with_instruction(r.prompt, cfg.instruction_text),
            answer=r.answer,
            meta={**r.columns, **origin, "row": r.where},
            messages=_with_instruction(r.messages, cfg.instruction_text),
        )
        for r in rows
    ]


def _with_instruction(messages: tuple | None, instruction: str) -> tuple | None:
    if messages is None or not instruction:
        return messages
    last = dict(messages[-1], content=with_instruction(messages[-1]["content"], instruction))
    return (*messages[:-1], last)


def split_rows(rows: list[Row], eval_rows: list[Row] | None, cfg: TaskConfig, where: str,
               eval_knob: str) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows: eval is all of `eval_rows` when given, else a seeded hold-out of
    `cfg.eval_size` rows; train drops any row whose prompt is held out, then keeps `cfg.train_size`.
    `eval_knob` is the setting that names an eval source instead, for the error message."""
    if eval_rows is None:
        if len(rows) <= cfg.eval_size:
            raise DataError(
                f"{where}: has {len(rows)} rows, needs more than task.eval_size={cfg.eval_size} to hold out "
                f"an eval split; lower task.eval_size or set {eval_knob}"
            )
        picked = set(random.Random(f"{cfg.seed}/eval").sample(range(len(rows)), cfg.eval_size))
        eval_rows = [r for r in rows if r.index in picked]
        rows = [r for r in rows if r.index not in picked]
    # Duplicate prompts in a file would otherwise leak eval prompts into train.
    held_out = {r.prompt for r in eval_rows}
    train_rows = [r for r in rows if r.prompt not in held_out][: cfg.train_size]
    if not train_rows:
        raise DataError(f"{where}: no train rows left after holding out the eval prompts")
    return train_rows, eval_rows


def load_files(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) from `cfg.path`; eval is all of `cfg.eval_path`, else `cfg.eval_size` held-out rows."""
    rows = read_rows(cfg.path, cfg)
    eval_rows = read_rows(cfg.eval_path, cfg, split="test") if cfg.eval_path else None
    train_rows, eval_rows = split_rows(rows, eval_rows, cfg, cfg.path, "task.eval_path")
    eval_file = Path(cfg.eval_path or cfg.path)
    return (to_examples(train_rows, Path(cfg.path).stem, "train", {"file": cfg.path}, cfg),
            to_examples(eval_rows, eval_file.stem, "eval", {"file": str(eval_file)}, cfg))
