"""Bad inputs end in one message naming the file, row, field or key, with exit code 2 and no traceback.

Every case stops before a model loads (the tiny model is configured in case one would), so each test
takes well under a second after the first import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rollmill.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """main(argv)'s exit code and stderr, asserting that nothing printed a traceback."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


def train_args(tmp_path, *overrides: str) -> list[str]:
    """`rollmill train` on the tiny model with `overrides`; runs (if any were made) go under tmp_path."""
    sets = ["model.source=tiny", f"log.run_root={tmp_path / 'runs'}", "log.trackers=[]", *overrides]
    return ["train", *[arg for s in sets for arg in ("--set", s)]]


def data_file(tmp_path, text: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return str(path)


GOOD_ROW = json.dumps({"prompt": "What is 1 + 1?", "answer": 2})


# 1. data files
@pytest.mark.parametrize("text,words", [
    (None, ["missing.jsonl", "file does not exist"]),
    (GOOD_ROW + '\n{"prompt": \n', ["data.jsonl", "line 2", "invalid JSON"]),
    (GOOD_ROW + '\n{"prompt": "What is 2 + 2?"}\n', ["data.jsonl", "line 2", "missing field 'answer'"]),
    ("", ["data.jsonl", "has no rows"]),
], ids=["missing", "invalid-json", "missing-field", "empty"])
def test_bad_data_file(capsys, tmp_path, text, words):
    path = str(tmp_path / "missing.jsonl") if text is None else data_file(tmp_path, text)
    code, err = run_cli(capsys, *train_args(tmp_path, "task.source=file", f"task.path={path}"))
    assert code == 2 and all(w in err for w in words), err
    assert not (tmp_path / "runs").exists()


def test_bad_data_file_through_the_installed_command(tmp_path):
    # The real entry point, in case anything outside main() (logging, imports) printed a traceback.
    path = data_file(tmp_path, GOOD_ROW + "\nnot json\n")
    out = subprocess.run([sys.executable, "-m", "rollmill.cli", *train_args(tmp_path, "task.source=file",
                                                                            f"task.path={path}")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"rollmill: {path}: line 2: invalid JSON" in out.stderr


# 2. task names
def test_unknown_arithmetic_task_lists_the_known_ones(capsys, tmp_path):
    code, err = run_cli(capsys, *train_args(tmp_path, "task.name=triple"))
    assert code == 2 and "task.name = 'triple'" in err and "'larger_of_two'" in err and "'sequence_next'" in err


def test_unknown_reasoning_gym_dataset_suggests_close_names(capsys, tmp_path):
    code, err = run_cli(capsys, *train_args(tmp_path, "task.source=reasoning_gym", "task.name=basic_arithmatic"))
    assert code == 2 and "task.name = 'basic_arithmatic'" in err and "basic_arithmetic" in err


# 3. model folders
def test_model_folder_that_does_not_exist(capsys, tmp_path):
    code, err = run_cli(capsys, *train_args(tmp_path, "model.source=hf_dir", f"model.path={tmp_path / 'nope'}"))
    assert code == 2 and f"model folder {tmp_path / 'nope'} does not exist" in err


def test_model_path_that_is_a_file(capsys, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    code, err = run_cli(capsys, *train_args(tmp_path, "model.source=hf_dir", f"model.path={tmp_path / 'model.bin'}"))
    assert code == 2 and "model.bin is a file" in err and "model folder" in err


def test_model_folder_without_weights(capsys, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    code, err = run_cli(capsys, *train_args(tmp_path, "model.source=hf_dir", f"model.path={folder}"))
    assert code == 2 and f"model folder {folder} has no weights" in err and "config.json" not in err


# 4. optional engines and backends
def test_vllm_engine_without_vllm_names_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable, even where .venv-vllm has it
    code, err = run_cli(capsys, *train_args(tmp_path, "rollout.engine=vllm"))
    assert code == 2 and "rollout.engine = 'vllm'" in err and "package 'vllm'" in err and "make install-vllm" in err


def test_ray_backend_without_ray_names_the_install_command(capsys, tmp_path, monkeypatch):
    # Already one message before this file existed (a RuntimeConfig validator); kept here so every
    # optional package is covered in one place.
    monkeypatch.setitem(sys.modules, "ray", None)
    code, err = run_cli(capsys, *train_args(tmp_path, "runtime.backend=ray"))
    assert code == 2 and "runtime.backend" in err and "pip install 'rollmill[ray]'" in err


# 5. plot
@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    return run


def test_plot_missing_run_dir(capsys, tmp_path):
    code, err = run_cli(capsys, "plot", str(tmp_path / "nope"))
    assert code == 2 and f"run directory {tmp_path / 'nope'} does not exist" in err


def test_plot_folder_without_metrics(capsys, tmp_path):
    code, err = run_cli(capsys, "plot", str(tmp_path))
    assert code == 2 and f"{tmp_path} has no metrics.jsonl" in err


def test_plot_unwritable_output(capsys, run_dir):
    (run_dir / "curves.png").mkdir()  # a folder where the image should go: unwritable, even as root
    code, err = run_cli(capsys, "plot", str(run_dir))
    assert code == 2 and f"cannot write the plot to {run_dir / 'curves.png'}: Is a directory" in err


@pytest.mark.parametrize("name,words", [
    ("no/such/folder/curves.png", ["folder", "does not exist"]),
    ("curves.txt", ["image extension", "'png'"]),
], ids=["missing-folder", "bad-extension"])
def test_plot_bad_out_option(capsys, tmp_path, run_dir, name, words):
    out = tmp_path / name
    code, err = run_cli(capsys, "plot", str(run_dir), "--out", str(out))
    assert code == 2 and f"cannot write the plot to {out}" in err and all(w in err for w in words), err


# 6. held-out split larger than a procedural task (drew for minutes before being refused)
def test_eval_split_beyond_the_task_is_refused_at_config_time(capsys, tmp_path):
    code, err = run_cli(capsys, *train_args(tmp_path, "task.name=double", "task.eval_size=1000000"))
    assert code == 2 and "task.eval_size = 1000000" in err and "'double'" in err and "can generate 50" in err


# 7. unknown key inside a list item
def test_unknown_key_in_a_list_item_lists_the_items_keys(capsys, tmp_path):
    code, err = run_cli(capsys, *train_args(tmp_path, "reward.functions=[{name: format, wieght: 2}]"))
    assert code == 2 and "unknown key 'reward.functions.0.wieght'" in err
    assert "allowed keys here: ['kwargs', 'name', 'weight']" in err


# 8. a key renamed so that one name means one idea
def test_a_renamed_key_names_its_new_name(capsys, tmp_path):
    code, err = run_cli(capsys, *train_args(tmp_path, "algorithm.credit=waad"))
    assert code == 2 and "unknown key 'algorithm.credit' (renamed to 'algorithm.anchor_credit')" in err
