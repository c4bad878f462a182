"""The `cascade` section: SFT, a difficulty probe, then a second SFT and RL on the routed examples
(`pipeline: cascade`, docs/cascade.md).

The config's other sections are shared by every stage; each training stage changes what it needs
through `overrides`. `stage_tree` turns the cascade config into one stage's config tree, so the
config check (every stage validated before anything runs) and the runtime build stages the same way.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, field_validator, model_validator

from rollmill.config.base import Strict

SFT_STAGE, PROBE_STAGE, SFT2_STAGE, RL_STAGE = "1-sft", "2-probe", "3-sft2", "4-rl"
TRAINING_STAGES = {SFT_STAGE: "sft", SFT2_STAGE: "sft2", RL_STAGE: "rl"}  # stage -> its cascade knob

# Keys the cascade sets itself: which pipeline each stage is, which model it starts from, which data it reads.
_SET_BY_CASCADE = ("pipeline", "cascade", "task", "model.source", "model.path")


def expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """`{"train.steps": 5, "sft": {"pack": false}}` -> `{"train": {"steps": 5}, "sft": {"pack": false}}`: dotted
    keys and nested sections may be mixed; a key given twice (both ways) is an error."""
    tree: dict[str, Any] = {}
    for key, value in flatten(overrides).items():
        node = tree
        *parents, last = key.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'.'.join(parents[:i + 1])!r} is given a value and also keys under it")
        if last in node:
            raise ValueError(f"{key!r} is given twice")
        node[last] = value
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys (a non-empty dict is a section, anything else a value)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        for leaf, item in (flatten(value, f"{name}.") if isinstance(value, dict) and value else {name: value}).items():
            if leaf in out:
                raise ValueError(f"{leaf!r} is given twice")
            out[leaf] = item
    return out


def merge(tree: dict, overrides: dict) -> None:
    """Write nested `overrides` into `tree` in place, section by section."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)


class StageConfig(Strict):
    """One training stage: whether it runs, and what it changes in the shared sections."""

    enabled: bool = Field(True, description="run this stage; false: skip it (the next stage starts from the "
                          "model the one before it ended with)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="this stage's changes to the shared "
                                      "sections, as dotted keys (train.steps: 20) or a partial section tree "
                                      "(train: {steps: 20}); pipeline, task, model.source and model.path are the "
                                      "cascade's to set")

    @field_validator("overrides")
    @classmethod
    def _own_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        tree = expand_dotted(value)
        taken = [k for k in flatten(tree) if any(k == s or k.startswith(f"{s}.") for s in _SET_BY_CASCADE)]
        if taken:
            raise ValueError(f"{taken} are set by the cascade for each stage (the pipeline, the model the stage "
                             "starts from, the routed task rows); allowed: any other key of the shared sections")
        return tree


class ProbeConfig(Strict):
    """The difficulty probe: k replies per training example from the stage-1 model, scored by the task's
    verifier (`reward.correct`); each example's pass rate (the mean score) routes it."""

    k: int = Field(4, gt=0, description="replies sampled per example")
    temperature: float | None = Field(None, ge=0.0, description="sampling temperature; unset: the RL stage's "
                                      "rollout.sampling.temperature (the probe asks what RL would sample)")
    max_new_tokens: int | None = Field(None, gt=0, description="reply length cap; unset: the RL stage's "
                                       "rollout.sampling.max_new_tokens")
    max_examples: int | None = Field(256, gt=0, description="probe at most this many training examples (a "
                                     "seeded sample of them); unset: every training example. Examples not "
                                     "probed train in no later stage")
    easy: float = Field(1.0, description="pass rate >= easy: already solved, dropped")
    hard: float = Field(0.0, description="pass rate <= hard: too hard for RL (no reward to learn from), trained "
                        "by the second SFT stage on the verified answer")

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "ProbeConfig":
        if not self.hard < self.easy:
            raise ValueError(f"cascade.probe.hard ({self.hard}) must be below cascade.probe.easy ({self.easy}); "
                             "examples between the two go to RL")
        return self

    def route(self, pass_rate: float) -> str:
        """Where an example with this pass rate goes: easy (dropped), hard (second SFT) or learnable (RL)."""
        if pass_rate >= self.easy:
            return "easy"
        return "hard" if pass_rate <= self.hard else "learnable"


class CascadeConfig(Strict):
    """The stages of `pipeline: cascade`, each in its own run directory under the cascade's: 1-sft, 2-probe,
    3-sft2 (the hard examples), 4-rl (the learnable ones)."""

    sft: StageConfig = Field(default_factory=StageConfig, description="stage 1: SFT on the task's rows (or "
                             "`sft.path` conversations) from the configured model")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="stage 2: route each training example "
                               "by the stage-1 model's pass rate")
    sft2: StageConfig = Field(default_factory=StageConfig, description="stage 3: SFT on the hard examples' "
                              "verified answers")
    rl: StageConfig = Field(default_factory=StageConfig, description="stage 4: RL (the shared rollout, "
                            "algorithm and reward sections) on the learnable examples")

    @model_validator(mode="after")
    def _sft2_reads_the_hard_rows(self) -> "CascadeConfig":
        chat = [k for k in flatten(self.sft2.overrides) if k in ("sft.path", "sft.eval_path")]
        if chat:
            raise ValueError(f"cascade.sft2.overrides {chat}: stage 3 trains on the probe's hard rows, not on "
                             "chat conversations")
        return self


def stage_tree(base: dict, stage: str, model: dict | None = None, task: dict | None = None) -> dict:
    """The config tree of training `stage` of the cascade config `base` (dumped with aliases): the shared
    sections, the stage's pipeline and overrides, then `model` keys and the `task` section when given (the
    previous stage's checkpoint, the routed rows). A stage that starts from a previous stage's model skips
    the eval before training (that stage's last eval measured the same weights) unless its overrides ask
    for it."""
    settings: StageConfig = getattr(CascadeConfig.model_validate(base["cascade"]), TRAINING_STAGES[stage])
    tree = copy.deepcopy({k: v for k, v in base.items() if k != "cascade"})
    tree["name"] = f"{base['name']}-{stage}"
    tree["pipeline"] = "rlvr" if stage == RL_STAGE else "sft"
    if stage == RL_STAGE:
        tree.pop("sft", None)
    else:  # the shared algorithm section is the RL stage's
        tree.pop("algorithm", None)
    if stage == SFT2_STAGE:
        tree["sft"] = {**tree.get("sft", {}), "path": None, "eval_path": None}
    if model is not None:
        tree.setdefault("eval", {})["before"] = False
    merge(tree, settings.overrides)
    if model is not None:
        merge(tree["model"], model)
    if task is not None:
        tree["task"] = task
    return tree


def check_stages(base: dict, validate) -> None:
    """Validate every enabled training stage's config tree with `validate` (which raises ConfigError), so a
    bad override fails when the cascade config loads rather than hours in; the error names the stage."""
    cascade = CascadeConfig.model_validate(base["cascade"])
    for stage, knob in TRAINING_STAGES.items():
        if not getattr(cascade, knob).enabled:
            continue
        try:
            validate(stage_tree(base, stage))
        except ValueError as err:
            raise ValueError(stage_error(stage, err)) from None


def stage_error(stage: str, err: ValueError) -> str:
    """A training stage's config error as one line that names the stage and the knob its overrides are under."""
    detail = "; ".join(line.strip() for line in str(err).removeprefix("invalid config:").splitlines() if line.strip())
    return f"cascade stage {stage} (the shared sections with cascade.{TRAINING_STAGES[stage]}.overrides): {detail}"
