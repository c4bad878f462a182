"""`stream=True` replies as server-sent events of OpenAI `chat.completion.chunk` objects.

The engine interface hands back a completion only when it has finished, so the proxy generates the
whole reply first and then sends it as chunks: one per sampled token (its text, and its log-prob
when asked), in OpenAI's order. Clients parse it exactly like a token-by-token stream; they just
see the first token no sooner than the last.
"""

from __future__ import annotations

import json

from rollmill.proxy.api import logprob_entry
from rollmill.rollout.engine import Completion


def token_pieces(tokenizer, token_ids: list[int], visible: str) -> list[str]:
    """The text each token adds to `visible`; the pieces join to exactly `visible`.

    Decoding is incremental (each step decodes a short window, so a reply costs linear time): a
    token that ends inside a multi-byte character adds nothing until the character is complete, and
    tokens past the end of `visible` (a cut stop string) add nothing.
    """
    pieces, placed, prefix, read = [], 0, 0, 0
    for k in range(1, len(token_ids) + 1):
        # decoding from an earlier token keeps the word boundary (a leading space) a lone token would lose
        before = tokenizer.decode(token_ids[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(token_ids[prefix:k], skip_special_tokens=True)
        new = "" if after.endswith("\ufffd") else after[len(before):]
        if new:
            prefix, read = read, k
        piece = visible[placed:placed + len(new)]
        placed += len(piece)
        pieces.append(piece)
    if pieces:
        pieces[-1] += visible[placed:]  # a tokenizer whose windows do not add up to the whole
    return pieces


def finish_reason(completion: Completion, tool_calls: list[dict]) -> str:
    """OpenAI's finish reason: "tool_calls" when a reply that ended by itself made calls."""
    return "tool_calls" if tool_calls and completion.finish_reason == "stop" else completion.finish_reason


def _tool_call_deltas(calls: list[dict]) -> list[dict]:
    """The deltas OpenAI streams a reply's calls in: per call its id, type and name (with empty
    arguments), then its arguments, which clients append to by `index`."""
    deltas = []
    for k, call in enumerate(calls):
        head = {"index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        arguments = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
        deltas += [{"tool_calls": [head]}, {"tool_calls": [arguments]}]
    return deltas


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sse_events(tokenizer, head: dict, choices: list[Completion], contents: list[str], tool_calls: list[list[dict]],
               logprobs: bool, usage: dict | None) -> list[str]:
    """The event stream of a finished reply, ending with `data: [DONE]`.

    `head` holds the fields every chunk repeats (id, created, model); `contents[j]` is choice j's
    visible text (outside its tool calls), `tool_calls[j]` its parsed calls. Per choice: a chunk with
    the assistant role, one per token whose text or log-prob there is to send, two per tool call
    (see `_tool_call_deltas`), and one with the finish reason. `usage` (when the client asked for it) comes
    in a last chunk without choices, and as null on every other chunk, as OpenAI sends it.
    """
    extra = {} if usage is None else {"usage": None}

    def chunk(index: int, delta: dict, finish_reason: str | None = None, entries: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": entries} if entries else None,
                  "finish_reason": finish_reason}
        return _event({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    events = []
    for j, (completion, content, calls) in enumerate(zip(choices, contents, tool_calls)):
        events.append(chunk(j, {"role": "assistant"}))
        pieces = token_pieces(tokenizer, completion.token_ids, content)
        for token_id, logprob, piece in zip(completion.token_ids, completion.logprobs, pieces):
            if piece or logprobs:
                entries = [logprob_entry(tokenizer, token_id, logprob)] if logprobs else None
                events.append(chunk(j, {"content": piece}, entries=entries))
        events += [chunk(j, delta) for delta in _tool_call_deltas(calls)]
        events.append(chunk(j, {}, finish_reason(completion, calls)))
    if usage is not None:
        events.append(_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
    events.append(_event("[DONE]"))
    return events
