"""The `env` and `agent` sections: which environment an agentic run plays and how the agent talks to it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rollmill.config.base import Strict


class EnvConfig(Strict):
    """A registered env (`rollmill envs` lists them) and its keyword arguments.

    Each step plays `rollout.prompts_per_step` env seeds, `rollout.group_size` episodes per seed;
    held-out evaluation plays `eval_episodes` seeds that training never uses. The name and the
    kwargs are checked against the registry by `rollmill.checks.check_config`.
    """

    name: str = "frozenlake"
    kwargs: dict[str, Any] = {}
    eval_episodes: int = Field(32, gt=0, description="held-out episodes (one per eval seed)")
    step_timeout_s: float = Field(30.0, gt=0.0, description="a reset or step slower than this fails its episode")


class AgentConfig(Strict):
    """The multi-turn loop: action format, turn and context limits, invalid actions, credit assignment."""

    max_turns: int = Field(8, gt=0)
    chat_template: bool = Field(True, description="format turns with the tokenizer's chat template; False = plain transcript")
    max_context_tokens: int = Field(2048, gt=0, description="prompt + reply budget of one generation")
    context: Literal["keep_all", "sliding_window", "truncate_observations"] = Field(
        "keep_all", description="what the model sees of earlier turns")
    window_turns: int = Field(2, ge=0, description="turns kept by sliding_window / truncate_observations")
    action_format: Literal["tag", "json", "raw"] = Field(
        "tag", description="tag: <action>..</action>; json: <tool_call>{..}</tool_call>; raw: the whole reply")
    action_tag: str = Field("action", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    invalid_action_penalty: float = Field(-0.1, le=0.0, description="added to the reward of a turn whose action is invalid")
    system_prompt: str | None = Field(None, description="replaces the env's instructions ('' = no system message)")
    format_hint: bool = Field(True, description="append a line saying how to write an action to the system prompt")
    credit: Literal["starpo", "gigpo", "ipa", "turning_point"] = Field(
        "starpo", description="trajectory-wise (StarPO), step-wise (GiGPO), chunk-level (IPA) or TurningPoint")
    turn_gamma: float = Field(0.95, gt=0.0, le=1.0, description="per-turn discount (GiGPO step returns, IPA chunk "
                                                              "returns); algorithm.gamma is GAE's per-token one")
    gigpo_step_weight: float = Field(1.0, ge=0.0, description="weight of the anchor-state step advantage")
    gigpo_scale_by_std: bool = Field(True, description="divide GiGPO's two terms by their group std")
    ipa_failure_reward: float | None = Field(None, description="IPA return of failed episodes; None = 0")
    ipa_mismatch_bound: float | None = Field(5.0, gt=0.0, description="drop chunks whose engine/trainer ratio exceeds this")
    ipa_resample: int = Field(0, ge=0, description="IPA chunk-level initialized resampling: this many of each group's "
                              "episodes restart from a random chunk boundary of the group's episode 0 (env replayed)")
    tp_eta: float = Field(1.0, gt=0.0, description="TurningPoint: scale of the aggregated reward at turning points")
    tp_balance: bool = Field(True, description="TurningPoint: keep as many positive as negative turning points")
