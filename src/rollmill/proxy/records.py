"""What the proxy keeps of each model call: the exact prompt ids and the sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

from rollmill.rollout.engine import Completion


@dataclass
class ProxyCall:
    """One `/v1/chat/completions` request as the engine saw it.

    `index` orders the calls this proxy served (it keeps counting across `pop_calls` and
    `clear`). `prompt_ids` are the chat template over `messages` with the generation prompt;
    `choices` holds the engine's completions unchanged, one per requested `n`, so their
    `token_ids` and `logprobs` are exactly what was sampled (including a final eos token).
    """

    index: int
    session: str
    messages: list[dict]
    prompt_ids: list[int]
    choices: list[Completion]


def calls_to_chunks(calls: list[ProxyCall]) -> list[dict]:
    """One trainable chunk per sampled choice, in call order (chunk-level credit, IPA).

    An agent that talks to the proxy re-sends its whole history each call, so a call's prompt
    is not the previous call's tokens extended: each call stands alone as a chunk with its own
    prompt. A call with `n` > 1 gives `n` chunks that share a prompt.
    """
    return [
        {
            "session": call.session,
            "call": call.index,
            "choice": j,
            "prompt_ids": list(call.prompt_ids),
            "token_ids": list(choice.token_ids),
            "logprobs": list(choice.logprobs),
            "finish_reason": choice.finish_reason,
            "policy_version": choice.policy_version,
        }
        for call in calls
        for j, choice in enumerate(call.choices)
    ]
