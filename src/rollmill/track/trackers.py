"""Trackers: the dashboards a run mirrors its scalars to besides metrics.jsonl (`log.trackers`).

Each is opened once with the run's name (its directory's) and resolved config, is sent every step's
scalars (the numbers of that step's metrics.jsonl record, at its step) and is closed at the end. None
needs a network unless the user's environment asks for one:

- tensorboard: event files in run_dir/tensorboard; the config as a text summary.
- wandb: an offline run in run_dir/wandb (`wandb sync run_dir/wandb/offline-run-*` uploads it). A user's
  WANDB_MODE is respected; without it the run is online only when WANDB_API_KEY is set.
- trackio: trackio's local database (TRACKIO_DIR, by default ~/.cache/huggingface/trackio; `trackio show`).
  It stays there: trackio reads TRACKIO_DIR once, when imported, so pointing it at one run's directory
  would send every later run of the same process there too.
- mlflow: a SQLite store, run_dir/mlflow.db (`mlflow ui --backend-store-uri sqlite:///run_dir/mlflow.db`).
  MLflow 3 refuses its file store (mlruns/) unless MLFLOW_ALLOW_FILE_STORE is set, and names SQLite as
  its replacement.

Resume: wandb, trackio and mlflow continue the run they started, whose id run_dir/trackers.json keeps.
Their histories only grow, so a step already sent is not sent again: a run killed after its last
checkpoint redoes the steps since, and trackers.json also keeps the last step each tracker was sent.
The redone steps match the lost ones except for timings (resume is exact). TensorBoard instead hides
the events after the checkpoint and takes the redone steps afresh.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import yaml

PROJECT = "rollmill"  # the W&B project (unless WANDB_PROJECT), the trackio project, the MLflow experiment
STATE_FILE = "trackers.json"

# tracker -> (the modules it imports, what installs them)
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboardX",), "pip install tensorboardX"),
    "wandb": (("wandb",), "pip install 'rollmill[wandb]'"),
    "trackio": (("trackio",), "pip install 'rollmill[trackio]'"),
    # the SQLite store needs SQLAlchemy and alembic, which `mlflow` brings and `mlflow-skinny` does not
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install 'rollmill[mlflow]'"),
}


@dataclass(frozen=True)
class RunInfo:
    """What every tracker is opened with."""

    run_dir: Path
    config: dict
    resume_step: int | None  # the checkpoint step a resumed run continues after; None for a new run

    @property
    def name(self) -> str:
        return self.run_dir.name


class Tracker(Protocol):
    """One dashboard's side of a run."""

    run_id: str | None  # what continues the tracker's run on resume; None when nothing needs to

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in run_dir/tensorboard (tensorboardX)."""

    run_id = None

    def __init__(self, info: RunInfo, run_id: str | None = None):
        from tensorboardX import SummaryWriter

        # TensorBoard hides the events at and after purge_step: the checkpoint's own step stays
        purge_step = None if info.resume_step is None else info.resume_step + 1
        self.writer = SummaryWriter(str(info.run_dir / "tensorboard"), purge_step=purge_step)
        if info.resume_step is None:
            # indented: TensorBoard renders text as Markdown, and this keeps the YAML a code block
            text = yaml.safe_dump(info.config, sort_keys=False)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run, offline in run_dir/wandb unless the environment says otherwise."""

    def __init__(self, info: RunInfo, run_id: str | None = None):
        import wandb

        self.run_id = run_id or uuid.uuid4().hex[:12]
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT, name=info.name, id=self.run_id, resume="allow",
            mode=mode, dir=str(info.run_dir), config=info.config,
            allow_val_change=True,  # a resumed run may change its log, eval and checkpoint settings
            reinit="finish_previous",  # a run left open by one that failed in this process is not continued
            settings=wandb.Settings(console="off"))  # capturing the console would wrap the progress bar's stream

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run in its local database."""

    def __init__(self, info: RunInfo, run_id: str | None = None):
        import trackio

        # One database holds every run on the machine, named within a project: the suffix keeps runs in
        # two directories of the same name (runs/rlvr-<time> under two roots) apart.
        self.run_id = run_id or f"{info.name}-{uuid.uuid4().hex[:6]}"
        self.run = trackio.init(project=PROJECT, name=self.run_id, config=info.config, resume="allow")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_tracking_uri(run_dir: Path) -> str:
    """The MLflow tracking URI of a run's store (what `mlflow ui --backend-store-uri` takes)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class MlflowTracker:
    """An MLflow run in run_dir/mlflow.db: the config flattened into params, the scalars as metrics."""

    def __init__(self, info: RunInfo, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_tracking_uri(info.run_dir))
        if run_id is None:
            run_id = self._create(info)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _create(self, info: RunInfo) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        run_id = self.client.create_run(experiment_id, run_name=info.name).info.run_id
        # params are write-once, so they are logged when the run starts, never again on resume
        params = [Param(key, str(value)) for key, value in _flat(info.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[start:start + 100])
        return run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
            "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one run, and what continues them on resume: per tracker, its run id and the last
    step it was sent, in run_dir/trackers.json."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict, resume_step: int | None = None):
        self.state_path = run_dir / STATE_FILE
        # A new run starts new tracker runs; a resumed one keeps the entries of trackers it does not use
        # now, so that turning one back on later continues its run.
        self.state: dict[str, dict] = {}
        if resume_step is not None and self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())
        info = RunInfo(run_dir, config, resume_step)
        self.open: dict[str, Tracker] = {}
        try:
            for name in names:
                entry = self.state.get(name, {})
                tracker = self.open[name] = TRACKERS[name](info, entry.get("run_id"))
                if tracker.run_id is not None:
                    self.state[name] = {"run_id": tracker.run_id, "last_step": entry.get("last_step", -1)}
        except BaseException:
            self.close()  # those opened before the one that failed
            raise
        self._save()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Send `scalars` at `step` to each tracker that has not had that step yet."""
        for name, tracker in self.open.items():
            entry = self.state.get(name)
            if entry is not None and step <= entry["last_step"]:
                continue
            tracker.log(step, scalars)
            if entry is not None:
                entry["last_step"] = step
        self._save()

    def close(self) -> None:
        for tracker in self.open.values():
            tracker.close()

    def _save(self) -> None:
        if not self.state:
            return
        # written whole and renamed, so a kill mid-write leaves the previous state
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)
