"""Trackers (log.trackers): each one's local files, read back with its own reader, hold the scalars and
steps of metrics.jsonl; a resumed run continues the same tracker run without sending a step twice."""

import json
import shutil
import struct
from importlib.util import find_spec
from typing import get_args

import pytest

from rollmill.checks import check_config
from rollmill.config import ConfigError, config_from_dict
from rollmill.config.training import TrackerName
from rollmill.runtime import train
from rollmill.track import read_jsonl
from rollmill.track.metrics import NONDETERMINISTIC_PREFIXES, scalars
from rollmill.track.trackers import PROJECT, STATE_FILE, TRACKER_PACKAGES, TRACKERS, mlflow_tracking_uri

# What reads each tracker's files back, beyond the tracker's own package
READER_MODULES = {"tensorboard": ("tensorboard",)}


def _missing(name: str) -> list[str]:
    return [m for m in (*TRACKER_PACKAGES[name][0], *READER_MODULES.get(name, ())) if find_spec(m) is None]


INSTALLED = [name for name in TRACKER_PACKAGES if not _missing(name)]
# Each tracker runs when it and its reader are installed, as the dev extra installs them all
ALL = [pytest.param(name, marks=pytest.mark.skipif(
    bool(_missing(name)), reason=f"the {name} test needs {_missing(name)}, not installed here: "
    f"{TRACKER_PACKAGES[name][1]}, or `pip install -e '.[dev]'` (for MLflow that is mlflow-skinny with SQLAlchemy "
    "and alembic, where `mlflow` itself downloads 126 MB)")) for name in TRACKER_PACKAGES]


@pytest.fixture(scope="module", autouse=True)
def offline_trackers(tmp_path_factory):
    """W&B offline whatever the environment says, and the tracker homes outside the user's own: trackio's
    database is where TRACKIO_DIR points when trackio is first imported."""
    home = tmp_path_factory.mktemp("tracker_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.setenv("TRACKIO_DIR", str(home / "trackio"))
        yield


def _tensorboard(run_dir) -> list[tuple[int, str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # applies purge_step as TensorBoard shows it
    return [(e.step, tag, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]


def _wandb_records(path):
    """The records of a .wandb file: a LevelDB-style log of 32 KiB blocks, each record a protobuf `Record`
    in one or more chunks (header: crc32 4 bytes, length 2, type 1: full, first, middle, last). wandb
    0.31 ships the message types but no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb(run_dir) -> list[tuple[int, str, float]]:
    """Every history row of every session of the run (one offline-run-<time>-<id> folder each), in order."""
    out, run_ids = [], set()
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                run_ids.add(record.run.run_id)
            if record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                out += [(step, k, v) for k, v in items.items() if not k.startswith("_")]  # _step, _runtime: wandb's
    assert run_ids == {_state(run_dir)["wandb"]["run_id"]}, "every session continues one W&B run"
    return out


def _trackio(run_dir) -> list[tuple[int, str, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    rows = SQLiteStorage.get_logs(PROJECT, _state(run_dir)["trackio"]["run_id"])
    return [(row["step"], k, v) for row in rows for k, v in row.items() if k not in ("step", "timestamp")]


def _mlflow(run_dir) -> list[tuple[int, str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
    run_id = _state(run_dir)["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["name"] == "tiny"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id], "one MLflow run"
    return [(m.step, key, m.value) for key in run.data.metrics for m in client.get_metric_history(run_id, key)]


READERS = {"tensorboard": _tensorboard, "wandb": _wandb, "trackio": _trackio, "mlflow": _mlflow}


def _state(run_dir) -> dict:
    return json.loads((run_dir / STATE_FILE).read_text())


def _by_step(rows: list[tuple[int, str, float]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for step, key, value in rows:
        assert key not in out.setdefault(step, {}), f"{key} at step {step} was logged twice"
        out[step][key] = value
    return out


def _expected(run_dir) -> dict[int, dict]:
    return {record["step"]: scalars(record) for record in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.parametrize("tracker", ALL)
def test_tracker_holds_the_scalars_and_steps_of_metrics_jsonl(tracker, tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(log={"trackers": [tracker]}), run_dir)
    got, expected = _by_step(READERS[tracker](run_dir)), _expected(run_dir)
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3, 4]
    for step, values in expected.items():
        assert got[step].keys() == values.keys(), step
        # TensorBoard keeps float32
        assert got[step] == pytest.approx(values, rel=1e-6, abs=1e-9, nan_ok=True), step


def test_resumed_run_continues_each_tracker_run_without_a_step_twice(tiny_cfg, tmp_path):
    """Killed after step 3 with its last checkpoint at 2: the resume redoes step 3, which the append-only
    trackers already have and TensorBoard hides; each tracker ends with steps 0-4 once, in one run."""
    if not INSTALLED:
        pytest.skip("no tracker and its reader installed: `pip install -e '.[dev]'` has them all")
    cfg = tiny_cfg(log={"trackers": INSTALLED})
    run_dir = tmp_path / "run"
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})}), run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")  # as if killed before that checkpoint
    first_ids = {name: entry["run_id"] for name, entry in _state(run_dir).items()}
    train(cfg, run_dir, resume=True)
    assert {name: entry["run_id"] for name, entry in _state(run_dir).items()} == first_ids
    expected = _expected(run_dir)
    for name in INSTALLED:
        got = _by_step(READERS[name](run_dir))
        assert sorted(got) == [0, 1, 2, 3, 4], name
        for step, values in expected.items():
            kept = {k: v for k, v in values.items() if not k.startswith(NONDETERMINISTIC_PREFIXES)}
            assert {k: got[step][k] for k in kept} == pytest.approx(kept, rel=1e-6, abs=1e-9, nan_ok=True), (name, step)


def test_tracker_names_are_checked():
    assert set(get_args(TrackerName)) == set(TRACKERS) == set(TRACKER_PACKAGES)
    with pytest.raises(ConfigError, match="'tensorboard', 'wandb', 'trackio' or 'mlflow'"):
        config_from_dict({"log": {"trackers": ["neptune"]}})
    with pytest.raises(ConfigError, match="listed more than once"):
        config_from_dict({"log": {"trackers": ["wandb", "wandb"]}})


def test_old_tensorboard_flag_still_reads():
    """Runs whose config.yaml has `log.tensorboard` must still resume."""
    with pytest.warns(FutureWarning, match="log.trackers"):
        assert config_from_dict({"log": {"tensorboard": False}}).log.trackers == []
    with pytest.raises(ConfigError, match="give only log.trackers"):
        config_from_dict({"log": {"tensorboard": True, "trackers": ["wandb"]}})


def test_missing_tracker_package_is_a_config_error(tiny_cfg, monkeypatch):
    real = find_spec
    monkeypatch.setattr("rollmill.input_checks.find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError) as err:
        check_config(tiny_cfg(log={"trackers": ["tensorboard", "wandb"]}))
    assert str(err.value) == ("invalid config:\n  log.trackers.1 = 'wandb': the wandb tracker needs 'wandb', which is "
                              "not installed here: pip install 'rollmill[wandb]'")
