"""What the proxy keeps of each model call: the exact prompt ids and the sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

from rollmill.rollout.engine import Completion
from rollmill.types import Row, Trajectory, Turn


@dataclass
class ProxyCall:
    """One `/v1/chat/completions` request as the engine saw it.

    `index` orders the calls this proxy served (it keeps counting across `pop_calls` and
    `clear`). `prompt_ids` are the chat template over `messages` with the generation prompt;
    `choices` holds the engine's completions unchanged, one per requested `n`, so their
    `token_ids` and `logprobs` are exactly what was sampled (including a final eos token).
    `tools` are the tool schemas rendered into the prompt (None when there were none).
    """

    index: int
    session: str
    messages: list[dict]
    prompt_ids: list[int]
    choices: list[Completion]
    tools: list[dict] | None = None


def calls_to_trajectory(calls: list[ProxyCall], reward: float, *, prompt_id: int = 0, group_id: int = 0, index: int = 0,
                        success: bool = False, env_name: str = "harness") -> Trajectory:
    """One trajectory from an agent's calls: one row (one chunk, for IPA) and one turn per call.

    An agent that talks to the proxy re-sends its whole history each call, so a call's prompt is not
    the previous call's tokens extended: each row stands alone with its own prompt. Each call's
    first choice is what trains; the outcome reward sits on the last turn.
    """
    traj = Trajectory(group_id, index, prompt_id, success=success, end_reason="terminated", info={"env": env_name})
    for k, call in enumerate(calls):
        sampled = call.choices[0]
        row = Row(prompt_ids=list(call.prompt_ids))
        # per-token versions where the rollout driver filled them (a reply continued across a weight
        # update), else the engine's one version for the whole reply
        versions = list(sampled.versions) or [sampled.policy_version] * len(sampled.token_ids)
        row.append_sampled(list(sampled.token_ids), list(sampled.logprobs), versions, turn=k)
        traj.rows.append(row)
        traj.turns.append(Turn(reply=sampled.text, action=sampled.text, observation="",
                               reward=reward if k == len(calls) - 1 else 0.0, state=None, progress=None,
                               invalid=False, row=k, finish_reason=sampled.finish_reason))
    traj.initial_observation = calls[0].messages[-1]["content"] if calls else ""
    return traj
