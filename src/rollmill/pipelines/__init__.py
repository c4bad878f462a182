"""Pipelines: what each role of a run does, registered by the name `pipeline:` takes in a config.

`PIPELINES` maps that name to a pipeline object; the runtime looks it up in every role, so a new
pipeline plugs in by registering here, without touching the runtime or the other pipelines.
"""

from rollmill.pipelines.agentic import AgenticPipeline
from rollmill.pipelines.base import EpisodeContext, Episodes, RLPipeline, Source
from rollmill.pipelines.dpo import DPOPipeline
from rollmill.pipelines.rlvr import RLVRPipeline

PIPELINES: dict[str, RLPipeline] = {"rlvr": RLVRPipeline(), "agentic": AgenticPipeline(), "dpo": DPOPipeline()}

__all__ = ["PIPELINES", "EpisodeContext", "Episodes", "RLPipeline", "Source"]
