"""Loss masks from the chat template: which tokens of a conversation are the assistant's.

The template is rendered incrementally instead of searched for role strings (which differ per
model, and may appear in the content): for each assistant message, the conversation up to it with
the generation prompt (what the engine is given at inference) and the conversation up to and
including it. The text between the two is the reply as the template writes it, closed by its
end-of-turn marker; what follows that marker (a newline before the next turn) is the next turn's.

Each piece is tokenized on its own and the ids concatenated, so no token straddles a boundary and
the prompt's tokens are exactly those `pipelines.common.encode_prompt` gives the engine.
"""

from __future__ import annotations

from typing import Sequence

from rollmill.tasks import DataError


class TemplateError(DataError):
    """A chat template whose renderings are not prefixes of each other, so no reply can be located in it."""


def _render(tokenizer, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces in order: each assistant reply with the
    end-of-turn token that closes it is trained, everything else is not. Their concatenation is the
    whole conversation as the template renders it."""
    eos = tokenizer.eos_token
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text the pieces so far cover
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError(f"the chat template does not render message {i} (assistant) after the messages "
                                "before it, so its reply cannot be located; SFT needs a template whose renderings of "
                                "a growing conversation extend each other")
        reply = after[len(before):]
        # the end-of-turn token closes the reply; text after it (a newline) leads into the next turn
        close = reply.rfind(eos) if eos else -1
        if close >= 0:
            reply = reply[: close + len(eos)]
        pieces += [(before[len(done):], False), (reply, True)]
        done = before + reply
    whole = _render(tokenizer, messages, generation_prompt=False)
    if not whole.startswith(done):
        raise TemplateError("the chat template renders the whole conversation differently from its parts")
    pieces.append((whole[len(done):], False))
    return [(text, trained) for text, trained in pieces if text]


def tokenize_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation: mask 1 exactly on the tokens of every assistant reply and
    the end-of-turn token closing it, 0 elsewhere (system, user and tool turns, role headers, separators)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in assistant_spans(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask
