"""Run tracking: metrics and sample logs, TensorBoard, plots."""

from rollmill.track.metrics import RunLogger, deterministic_metrics, read_jsonl
from rollmill.track.plot import plot_run

__all__ = ["RunLogger", "deterministic_metrics", "plot_run", "read_jsonl"]
