"""Run tracking: metrics and sample logs, trackers (TensorBoard, W&B, Trackio, MLflow), plots."""

from rollmill.track.metrics import RunLogger, deterministic_metrics, read_jsonl
from rollmill.track.plot import plot_run
from rollmill.track.show import format_samples

__all__ = ["RunLogger", "deterministic_metrics", "format_samples", "plot_run", "read_jsonl"]
