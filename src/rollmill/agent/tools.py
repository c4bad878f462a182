"""Native tool calling: tool schemas rendered by the chat template, tool calls parsed from the reply.

Tools are OpenAI function schemas (`{"type": "function", "function": {name, description,
parameters}}`). A chat template that knows tools renders them itself (`apply_chat_template(...,
tools=...)`), in the format its model was trained on. A template that ignores them gets them in
the system message instead (`TOOLS_PREAMBLE`, Hermes' wording and format), so the model still
sees every schema. Replies are parsed for Hermes/Qwen-style calls:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (also `"parameters"` for the arguments,
as Llama 3 writes them), and the calls come back in OpenAI's shape.
"""

from __future__ import annotations

import json
import re

_PROBE = "rollmill_probe_tool"
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes the `tools` it is given into the prompt."""
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=probe, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that chokes on tools cannot render them
        return False
    return _PROBE in text


def tools_text(tools: list[dict]) -> str:
    """The tool schemas as the system-message fallback writes them: one JSON schema a line."""
    return TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))


def for_template(messages: list[dict], tools: list[dict] | None, native: bool) -> list[dict]:
    """Messages ready for the chat template.

    With a template that renders tools (`native`), OpenAI-shaped assistant `tool_calls` get their
    `arguments` as objects, which is what templates expect. Otherwise the schemas join the system
    message (a new one when there is none) and assistant tool calls are written into the content in
    the Hermes format, so a template that only renders `content` still shows them.
    """
    out = [_template_calls(m) if native else _inline_calls(m) for m in messages]
    if tools and not native:
        text = tools_text(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _template_calls(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        function = dict(call.get("function") or {})
        function["arguments"] = _arguments_object(function.get("arguments", {}))
        fixed.append({**call, "function": function})
    return {**message, "tool_calls": fixed}


def _inline_calls(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = []
    for call in calls:
        function = call.get("function") or {}
        body = {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments", {}))}
        blocks.append(f"<tool_call>\n{json.dumps(body)}\n</tool_call>")
    content = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def parse_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str | None, list[dict]]:
    """(the text outside the calls, or None when there is none; the calls in OpenAI's shape).

    Each `<tool_call>` block holding a JSON object with a string `name` becomes
    `{"id", "type": "function", "function": {"name", "arguments": JSON string}}`; blocks that do
    not parse stay in the text, so a malformed call reads as an ordinary reply. Call k gets the id
    `f"{id_prefix}{k}"`.
    """
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        call = _call_object(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"{id_prefix}{len(calls)}", "type": "function",
                      "function": {"name": call[0], "arguments": json.dumps(call[1])}})
    content = ("".join(kept) + text[last:]).strip()
    return (content or None), calls


def _call_object(body: str) -> tuple[str, object] | None:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], _arguments_object(arguments)


def call_action(call: dict) -> str:
    """An OpenAI-shaped tool call as the action string an env's `step` gets: `{"name", "arguments"}` JSON."""
    function = call["function"]
    return json.dumps({"name": function["name"], "arguments": _arguments_object(function["arguments"])})
