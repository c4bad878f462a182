"""SFT data: the conversations a run trains on and holds out.

Two sources, each giving (train, eval) lists of conversations (tuples of {"role", "content"} dicts):
- the task's prompt/answer rows (`task:`, any source: arithmetic, reasoning_gym, file, hub, a user's
  loader): the prompt exactly as an RL run sends it to the engine, then the verified answer as the
  assistant reply (`sft.completion_format`);
- a file of chat conversations (`sft.path`), every assistant turn of which trains.
"""

from __future__ import annotations

import json
from pathlib import Path

from rollmill.config import RunConfig, TaskConfig
from rollmill.tasks import DataError, Example
from rollmill.tasks.files import ROLES, Row, read_json_array, split_rows

Conversation = tuple[dict, ...]
CHAT_FILES = (".jsonl", ".json")


def prompt_chat(example: Example, task: TaskConfig) -> list[dict]:
    """The chat `pipelines.common.encode_prompt` renders for `example`: its messages (or the prompt as one user
    message), opened by `task.system_prompt` unless the chat has its own system message."""
    chat = list(example.messages or [{"role": "user", "content": example.prompt}])
    if task.system_prompt and chat[0]["role"] != "system":
        chat.insert(0, {"role": "system", "content": task.system_prompt})
    return chat


def task_conversation(example: Example, cfg: RunConfig) -> Conversation:
    """The example's prompt, then its verified answer as the assistant's reply."""
    reply = cfg.sft.completion_format.format(answer=example.answer)
    return (*prompt_chat(example, cfg.task), {"role": "assistant", "content": reply})


def load_chat(cfg: RunConfig) -> tuple[list[Conversation], list[Conversation]]:
    """(train, eval) conversations from `sft.path`: eval is all of `sft.eval_path`, else `task.eval_size`
    conversations held out of `sft.path` (seeded by `task.seed`); train keeps at most `task.train_size`."""
    sft = cfg.sft
    rows = read_conversations(sft.path, sft.messages_field, "sft.path")
    eval_rows = read_conversations(sft.eval_path, sft.messages_field, "sft.eval_path") if sft.eval_path else None
    train, held_out = split_rows(rows, eval_rows, cfg.task, sft.path, "sft.eval_path")
    system = cfg.task.system_prompt
    return [with_system(r.messages, system) for r in train], [with_system(r.messages, system) for r in held_out]


def with_system(messages: Conversation, system_prompt: str | None) -> Conversation:
    """`messages` opened by `system_prompt` unless they have a system message of their own."""
    if system_prompt and messages[0]["role"] != "system":
        return ({"role": "system", "content": system_prompt}, *messages)
    return messages


def read_conversations(path_text: str, field: str, key: str) -> list[Row]:
    """Every conversation of a .jsonl or .json file, checked; `key` (the setting that names the file) and
    the file, row and message are named in errors. A row's `prompt` is the whole conversation, so
    identical conversations are never both trained and held out."""
    rows = []
    for index, (where, record) in enumerate(read_records(path_text, key)):
        messages = _conversation(record, field, f"{Path(path_text)}: {where}")
        rows.append(Row(index, where, json.dumps(messages, sort_keys=True), "", messages, {}))
    if not rows:
        raise DataError(f"{key} = {path_text!r}: has no conversations")
    return rows


def read_records(path_text: str, key: str) -> list[tuple[str, object]]:
    """(where, record) for each record of a .jsonl or .json file: "line N" of a .jsonl file, "row index N"
    of a .json array; `key` (the setting that names the file) is named in errors."""
    path = Path(path_text)
    if path.suffix not in CHAT_FILES:
        raise DataError(f"{key} = {path_text!r}: unsupported extension {path.suffix!r}; allowed: {list(CHAT_FILES)}")
    if not path.is_file():
        raise DataError(f"{key} = {path_text!r}: file does not exist")
    if path.suffix == ".json":
        return [(f"row index {i}", r) for i, r in enumerate(read_json_array(path))]
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    return out


def _conversation(record: object, field: str, where: str) -> Conversation:
    """A conversation, checked: known roles, text content, and at least one assistant reply with text."""
    if not isinstance(record, dict) or field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: missing field {field!r} (sft.messages_field; got {fields})")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {field!r}: message {i} must be {{'role': one of {list(ROLES)}, "
                            f"'content': text}}, got {m!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: field {field!r}: no assistant message with text, so nothing would train")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)
