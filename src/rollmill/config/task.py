"""Where prompts and reference answers come from (`task:`), one source or a weighted mix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from rollmill.config.base import Strict


class TaskConfig(Strict):
    """Where prompts and reference answers come from, and the held-out split.

    source `arithmetic` uses a built-in generator (`name` picks it), `reasoning_gym` a reasoning-gym
    dataset (`name` is its dataset name), `file` a local JSONL or Parquet file at `path`, `hub` a
    Hugging Face Hub dataset already in the local cache (`name` is "org/dataset"; read offline). Any other
    source is a user's loader, an entry point (`rollmill.tasks`) or `module:attr` / `file.py:attr`
    (rollmill.plugins), called with this config and returning (train, eval) rows.
    """

    source: str = "arithmetic"
    name: str = "larger_of_two"
    path: str | None = None
    eval_path: str | None = None
    subset: str | None = Field(None, description="source hub: the dataset's subset (its config name)")
    split: str = Field("train", description="source hub: the split that trains")
    eval_split: str | None = Field(None, description="source hub: the split that evaluates; unset: a seeded "
                                   "hold-out of eval_size rows of `split`")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    train_size: int = Field(2000, gt=0)
    eval_size: int = Field(96, gt=0)
    seed: int = 0
    instruction: str | None = Field(None, description="appended to each question; unset: the source's own "
                                    "('Answer with just the number.' for arithmetic and reasoning_gym, none for "
                                    "files and user loaders)")
    system_prompt: str | None = None
    chat_template: bool = True
    mix: list["TaskConfig"] = Field(default_factory=list, description="several sources in one run, each a task "
                                    "config with a `weight` (its share of training prompts) and an optional `label`")
    weight: float = Field(1.0, gt=0, description="within task.mix: this source's share of training prompts")
    label: str | None = Field(None, description="within task.mix: its name in per-source metrics")

    @property
    def mix_label(self) -> str:
        """This source's name in per-source metrics: `label`, else its task name or file stem."""
        if self.label:
            return self.label
        if self.source == "file":
            return Path(self.path).stem
        if self.source == "hub":
            return self.name.split("/")[-1]
        return self.name if self.source in ("arithmetic", "reasoning_gym") else self.source

    @property
    def instruction_text(self) -> str:
        """The instruction appended to each question: `instruction`, or the source's default."""
        if self.instruction is not None:
            return self.instruction
        return "Answer with just the number." if self.source in ("arithmetic", "reasoning_gym") else ""

    @model_validator(mode="after")
    def _path_for_file(self) -> "TaskConfig":
        if self.source == "file" and not self.path:
            raise ValueError("task.path is required when task.source is 'file'")
        # Checked by value, not by which keys were given: a saved config (run_dir/config.yaml) holds every key.
        hub_only = [k for k, unset in (("subset", None), ("split", "train"), ("eval_split", None))
                    if getattr(self, k) != unset]
        if self.source != "hub" and hub_only:
            raise ValueError(f"task.{hub_only[0]} applies only to task.source 'hub' (source is {self.source!r})")
        if any(item.mix for item in self.mix):
            raise ValueError("task.mix items are single sources: a task.mix item may not have a mix of its own")
        labels = [item.mix_label for item in self.mix]
        if len(set(labels)) != len(labels):
            raise ValueError(f"task.mix sources need distinct labels (got {labels}): set task.mix.N.label")
        return self
