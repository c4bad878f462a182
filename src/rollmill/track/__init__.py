"""Run tracking: metrics and sample logs, TensorBoard, plots."""

from rollmill.track.metrics import RunLogger, read_jsonl
from rollmill.track.plot import plot_run

__all__ = ["RunLogger", "plot_run", "read_jsonl"]
