"""The one run loop every pipeline shares: steps, held-out evals, checkpoints, exact resume, Ctrl-C,
the progress bar, metrics, sample dumps and plots.

What a step does belongs to a `Job` (the RL runtime's `RLJob`, or any other training stage): this
loop only decides when to evaluate, log, checkpoint and stop.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from rollmill.config import ConfigError, RunConfig, dump_config, load_config
from rollmill.runtime.progress import StepProgress
from rollmill.track import RunLogger, plot_run
from rollmill.track.metrics import RUN_FILES, clear_run, run_files
from rollmill.train.checkpoint import newest_readable

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    steps: int


class Job(Protocol):
    """One training run's work, step by step."""

    headline: str  # the held-out metric shown in logs and the progress bar
    step: int

    def train_step(self) -> tuple[dict, list[dict]]:
        """One update: its metrics record (with "step") and readable sample dumps."""
        ...

    def evaluate(self) -> dict: ...

    def check_health(self, record: dict) -> None:
        """Raise when the run cannot learn anything (e.g. every sample failing)."""
        ...

    def save(self, extra: dict) -> Path: ...

    def resume(self) -> dict | None:
        """Restore the latest checkpoint (None when there is none); return its loop state."""
        ...

    def close(self) -> None: ...


def check_finite_loss(record: dict, what: str, advice: str) -> None:
    """Stop on a step whose loss is not a finite number: it does not come back, and every later step trains on it."""
    if not math.isfinite(record["loss"]):
        raise RuntimeError(f"step {record['step']}: the {what} loss is {record['loss']}; {advice}")


def resume_newest(run_dir: Path, load) -> tuple[Path, dict] | None:
    """Restore the newest readable checkpoint under `run_dir`/checkpoints with `load` (an unreadable one falls back
    to the one before); return it and its loop state, or None when there is none."""
    found = newest_readable(run_dir / "checkpoints", load)
    if found is not None:
        log.info("resumed from %s (step %d)", found[0], found[1]["step"])
    return found


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, names: Sequence[str] = RUN_FILES) -> None:
    """Refuse to start a new run where one already is (its metrics would interleave with the new ones and
    its checkpoints outlive them): continue it (`resume`), replace it (`overwrite`: what it wrote, the
    `names` in `run_dir`, is removed first), or pick another directory. Call it before any role is built."""
    found = run_files(run_dir, names)
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run ({', '.join(found)}): continue it "
                          "with --resume, replace it with --overwrite, or choose another --run-dir")
    log.info("--overwrite: removing the previous run's %s from %s", ", ".join(found), run_dir)
    clear_run(run_dir, names)


# Settings a resumed run may change: when to stop, evaluate, checkpoint and log, and where the roles run.
# Anything else (model, task, rewards, sampling, algorithm, optimizer and LR schedule, seeds) would make
# the resumed run a different one than its checkpoint and config.yaml say.
CHANGEABLE_ON_RESUME = ("name", "train.steps", "eval.", "checkpoint.", "log.", "runtime.", "model.device",
                        "rollout.engine", "rollout.batch_size", "rollout.prefix_cache_mb", "rollout.logprob_tolerance",
                        "rollout.logprob_check", "rollout.weight_sync_timeout_s")


def check_resume_config(cfg: RunConfig, run_dir: Path) -> None:
    """On `--resume`, compare `cfg` with the run's own config.yaml: changes to settings that cannot change
    mid-run are refused naming each key; the others are logged and apply."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    before, after = _flat(load_config(saved).model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    fixed = [k for k in changed if not k.startswith(CHANGEABLE_ON_RESUME)]
    if fixed:
        raise ConfigError("--resume with settings that cannot change mid-run: " + "; ".join(
            f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in fixed) + f". Resume with the run's own config "
            f"({saved}) or start a new run")
    for k in changed:
        log.info("resume: %s changes from %r to %r", k, before.get(k), after.get(k))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_job(job: Job, cfg: RunConfig, run_dir: Path, resume: bool = False) -> TrainResult:
    """Step `job` to `cfg.train.steps`, evaluating and checkpointing on schedule; always closes it."""
    try:
        return _run(job, cfg, run_dir, resume)
    finally:
        job.close()


def _run(job: Job, cfg: RunConfig, run_dir: Path, resume: bool) -> TrainResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_before = None
    resume_step = None
    if resume:
        state = job.resume()
        if state is None:  # killed before its first checkpoint: start over, not after its step-0 record
            log.info("no checkpoint in %s: starting from step 0", run_dir)
            clear_run(run_dir)
        else:
            eval_before, resume_step = state.get("eval_before"), job.step
    dump_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, cfg.log.trackers, resume_step, config=cfg.model_dump(mode="json", by_alias=True))
    try:  # a crash still closes the trackers (an MLflow run would otherwise stay RUNNING)
        eval_before, eval_after, interrupted = _steps(job, cfg, logger, eval_before)
    finally:
        logger.close()
    plot_run(run_dir)
    if interrupted:
        log.info("interrupted: stopped after step %d with a checkpoint; continue with --resume", job.step)
    return TrainResult(run_dir, eval_before, eval_after, job.step)


def _steps(job: Job, cfg: RunConfig, logger: RunLogger, eval_before: dict | None) -> tuple[dict | None, dict | None, bool]:
    """The training steps, with held-out evals and checkpoints on schedule: (eval before, eval after,
    whether Ctrl-C stopped it)."""
    if job.step == 0 and cfg.eval.before:
        eval_before = job.evaluate()
        logger.log_metrics({"step": 0, **eval_before})
        log.info("held-out %s before training: %.3f", job.headline, eval_before[job.headline])
    eval_after = None
    progress = StepProgress(cfg.train.steps, job.step, job.headline, bar=cfg.log.progress)
    with progress, _StopOnInterrupt() as interrupt:
        while job.step < cfg.train.steps and not interrupt.requested:
            record, samples = job.train_step()
            job.check_health(record)
            last = job.step == cfg.train.steps
            if last or (cfg.eval.every and job.step % cfg.eval.every == 0):
                eval_after = job.evaluate()
                record.update(eval_after)
                log.info("step %d: held-out %s %.3f", job.step, job.headline, eval_after[job.headline])
            logger.log_metrics(record)
            logger.log_samples(job.step, samples)
            if last or interrupt.requested or (cfg.checkpoint.every and job.step % cfg.checkpoint.every == 0):
                path = job.save({"eval_before": eval_before})
                log.info("step %d: checkpoint saved to %s", job.step, path)
            progress.step_done(job.step, record)
    return eval_before, eval_after, interrupt.requested


class _StopOnInterrupt:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
