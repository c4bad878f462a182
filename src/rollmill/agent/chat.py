"""Chat formatting for multi-turn episodes, built by appending tokens (never re-tokenizing a reply).

The chat template is probed once for the text that closes an assistant turn and opens the next
user turn. After each reply the agent appends only the tokens of that glue plus the observation,
so the training sequence holds the sampled token ids exactly as the engine produced them.
"""

from __future__ import annotations

import json
import re

from rollmill.agent.tools import for_template, renders_tools

# placeholders no real text contains
_A, _B, _OBS, _NAME, _ID = "\x01A\x01", "\x01B\x01", "\x01OBS\x01", "\x01NAME\x01", "\x01ID\x01"


class ChatFormat:
    """Token ids for the first prompt and for each observation that follows a reply.

    With `tools` (OpenAI function schemas) every prompt carries them (rendered by the template, or
    in the system message when the template ignores tools, see `rollmill.agent.tools`), and the
    answer to a tool call goes back in the template's `tool` role instead of the `user` role.
    """

    def __init__(self, tokenizer, tools: list[dict] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the agentic pipeline needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.tools = tools or None
        self.native_tools = bool(self.tools) and renders_tools(tokenizer)
        turns = [{"role": "user", "content": _A}, {"role": "assistant", "content": _B}]
        base = self._render(turns, generation=False)
        # what the template writes after an assistant's text, then around the next user message
        self.close_assistant = base[base.index(_B) + len(_B):]
        self.user_prefix, self.user_suffix = self._glue(base, turns + [{"role": "user", "content": _OBS}])
        if self.tools:
            tool = {"role": "tool", "content": _OBS, "name": _NAME, "tool_call_id": _ID}
            self.tool_prefix, self.tool_suffix = self._glue(base, turns + [tool])
        self.eos_text = tokenizer.decode([self.eos_id]) if self.eos_id is not None else ""

    def _glue(self, base: str, messages: list[dict]) -> tuple[str, str]:
        """The text the template adds around the last message's content when it follows `base`."""
        extended = self._render(messages, generation=True)
        if not extended.startswith(base):
            raise ValueError("the chat template re-renders earlier turns when a turn is added; "
                             "multi-turn token appending needs an append-only template")
        prefix, suffix = extended[len(base):].split(_OBS)
        return prefix, suffix

    def _render(self, messages: list[dict], generation: bool) -> str:
        messages = for_template(messages, self.tools, self.native_tools)
        return self.tokenizer.apply_chat_template(messages, tools=self.tools if self.native_tools else None,
                                                  tokenize=False, add_generation_prompt=generation)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict]) -> list[int]:
        """Ids of a whole conversation, ending with the assistant's generation prompt."""
        return self.encode(self._render(messages, generation=True))

    def observation(self, observation: str, reply_ids: list[int], tool_call: dict | None = None) -> list[int]:
        """Ids to append after a reply: the end of the assistant turn, the user turn, the next prompt.

        A reply that ended with eos already holds the template's end-of-turn token; one cut by the
        length limit or a stop string gets it here (as env text, so it is never trained). The answer
        to `tool_call` (OpenAI-shaped) is a `tool` message carrying the call's name and id.
        """
        closing = self.close_assistant
        if reply_ids and reply_ids[-1] == self.eos_id and self.eos_text and closing.startswith(self.eos_text):
            closing = closing[len(self.eos_text):]
        if tool_call is None:
            return self.encode(closing + self.user_prefix + observation + self.user_suffix)
        name, call_id = tool_call["function"]["name"], tool_call["id"]
        prefix, suffix = (part.replace(_NAME, name).replace(_ID, call_id)
                          for part in (self.tool_prefix, self.tool_suffix))
        return self.encode(closing + prefix + observation + suffix)


class PlainFormat:
    """A transcript without chat markup: the system text, then observation, reply, observation...

    The model continues right after the observation's last character. Base models and tiny models
    trained from scratch use it: with no template suffix the final position sees the state itself.
    """

    def __init__(self, tokenizer, separator: str = "\n", tools: list[dict] | None = None):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.separator = separator
        self.tools = tools or None  # written into the system text: there is no template to render them

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict]) -> list[int]:
        messages = for_template(messages, self.tools, native=False)
        return self.encode(self.separator.join(m["content"] for m in messages))

    def observation(self, observation: str, reply_ids: list[int], tool_call: dict | None = None) -> list[int]:
        return self.encode(self.separator + observation)


def format_instruction(action_format: str, tag: str) -> str:
    """The line appended to the system prompt that tells the model how to write an action."""
    if action_format == "tag":
        return f"Think briefly if you like, then write your action as <{tag}>ACTION</{tag}>."
    if action_format == "json":
        return 'Call a tool by writing <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.'
    return "Reply with the action only."


def stop_strings(action_format: str, tag: str) -> tuple[str, ...]:
    """Generation stops once the action is complete, so nothing after it is sampled or trained."""
    if action_format == "tag":
        return (f"</{tag}>",)
    if action_format == "json":
        return ("</tool_call>",)
    return ()


def parse_action(reply: str, action_format: str, tag: str = "action") -> str | None:
    """The action in a reply, or None when there is none in the expected format."""
    if action_format == "tag":
        found = re.search(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", reply, flags=re.DOTALL)
        action = found.group(1).strip() if found else ""
        return action or None
    if action_format == "json":
        found = re.search(r"<tool_call>(.*?)</tool_call>", reply, flags=re.DOTALL)
        body = found.group(1) if found else reply
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            call = json.loads(body[start:end + 1])
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        return json.dumps({"name": call["name"], "arguments": call.get("arguments", {})})
    return reply.strip() or None
