"""Policy updates, batches and checkpoints."""

from rollmill.train.batch import TrainBatch, build_batch
from rollmill.train.checkpoint import list_checkpoints
from rollmill.train.consistency import engine_logprob_gap
from rollmill.train.logprobs import completion_logprobs
from rollmill.train.trainer import PolicyTrainer

__all__ = [
    "PolicyTrainer",
    "TrainBatch",
    "build_batch",
    "completion_logprobs",
    "engine_logprob_gap",
    "list_checkpoints",
]
