"""Run outputs: metrics.jsonl (one object per step), sample trajectories, and the trackers it mirrors to."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

from rollmill.track.trackers import STATE_FILE, Trackers

log = logging.getLogger(__name__)


# The offline DPO job's reference log-probs (rollmill.runtime.dpo_offline): a file of the run, so
# --overwrite removes it with the rest even though its fingerprint would keep a stale one from being read
REFERENCE_CACHE = "reference_logps.safetensors"
# What a run writes into its directory (besides other roles' files inside checkpoints/); wandb/,
# mlflow.db and trackers.json are its trackers' (rollmill.track.trackers)
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "curves.png", "tensorboard", "wandb", "mlflow.db",
             STATE_FILE, "checkpoints", REFERENCE_CACHE)


def run_files(run_dir: Path, names: Sequence[str] = RUN_FILES) -> list[str]:
    """The `names` (a run's files: RUN_FILES) present in `run_dir`: non-empty when it already holds a run."""
    return [name for name in names if (run_dir / name).exists()]


def clear_run(run_dir: Path, names: Sequence[str] = RUN_FILES) -> None:
    """Remove what a run wrote into `run_dir` (`names` only: anything else there is left alone)."""
    for name in run_files(run_dir, names):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _parsed_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, its JSON record) for each line of a .jsonl file; a last line cut short by a kill mid-write
    is dropped with a warning, a bad line elsewhere is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for k, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise ValueError(f"{path}: line {k + 1} is not JSON: {line[:80]!r}") from None
            log.warning("%s: dropping a last line cut short (a run killed mid-write): %r", path, line[:80])
    return out


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records past `max_step` (and a torn last line): a resumed run rewrites the steps it is about to redo."""
    if not path.is_file():
        return
    path.write_text("".join(line + "\n" for line, record in _parsed_lines(path) if record["step"] <= max_step))


# Timings and throughput vary run to run; everything else in a record is a function of the seed.
# engine/: how full the batch ran depends on timing; memory/: allocator peaks depend on the device
NONDETERMINISTIC_PREFIXES = ("time/", "throughput/", "engine/", "memory/")


def deterministic_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl without timing fields: what two runs of one seed must share."""
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC_PREFIXES)} for r in read_jsonl(path)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [record for _, record in _parsed_lines(path)]


class RunLogger:
    """Appends metrics and samples to the run directory; mirrors each record's scalars to `trackers`
    (names from `log.trackers`), which are opened with the run's resolved `config`."""

    def __init__(self, run_dir: Path, trackers: Sequence[str] = (), resume_step: int | None = None,
                 config: dict | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if resume_step is not None:
            _truncate_jsonl(self.metrics_path, resume_step)
            _truncate_jsonl(self.samples_path, resume_step)
        self.trackers = Trackers(trackers, run_dir, config or {}, resume_step)

    def log_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(record["step"], scalars(record))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with self.samples_path.open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.trackers.close()


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, less its step: what the trackers are sent."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
