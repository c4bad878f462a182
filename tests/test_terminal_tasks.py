import argparse
import shutil

import pytest

from rollmill.sandbox.spec import SandboxError, Status
from rollmill.terminal import (add_tasks_parser, builtin_tasks_dir, check_tasks, format_check, load_task, load_tasks,
                               start_task, verify)
from rollmill.terminal.check import CheckResult

TOML = """\
version = "1.0"
[metadata]
difficulty = "easy"
[agent]
timeout_sec = 30.0
[verifier]
timeout_sec = {verifier_timeout}
[environment]
memory_mb = 256
storage_mb = 64
"""


def make_task(root, name="t", test_sh="echo 1 > /logs/verifier/reward.txt", verifier_timeout=10.0,
              setup_sh=None, toml=None):
    """A minimal task directory; test.sh gets `mkdir -p /logs/verifier` in front of `test_sh`."""
    path = root / name
    (path / "tests").mkdir(parents=True)
    (path / "solution").mkdir()
    (path / "instruction.md").write_text("Do the thing.\n")
    (path / "task.toml").write_text(toml if toml is not None else TOML.format(verifier_timeout=verifier_timeout))
    (path / "tests" / "test.sh").write_text(f"mkdir -p /logs/verifier\n{test_sh}\n")
    (path / "solution" / "solve.sh").write_text("true\n")
    if setup_sh is not None:
        (path / "environment").mkdir()
        (path / "environment" / "setup.sh").write_text(setup_sh)
    return path


# ---------------------------------------------------------------------------------------------
# loading (no sandbox needed)


def test_load_task_reads_limits_and_metadata(tmp_path):
    task = load_task(make_task(tmp_path, verifier_timeout=12.5))
    assert (task.name, task.instruction) == ("t", "Do the thing.")
    assert (task.agent_timeout_s, task.verifier_timeout_s) == (30.0, 12.5)
    assert (task.memory_bytes, task.disk_bytes, task.network) == (256 << 20, 64 << 20, "none")
    assert task.metadata == {"difficulty": "easy"}
    spec = task.spec(exec_timeout_s=5.0)
    assert spec.workspace is None and spec.exec_timeout_s == 5.0 and "/tests" in spec.scratch_dirs


@pytest.mark.parametrize("toml, expected", [
    ("version = \n", "not valid TOML"),
    ("[agent]\ntimeout_sec = -1\n", "agent.timeout_sec must be a positive number"),
    ("[environment]\nmemory_mb = 1.5\n", "environment.memory_mb must be a positive integer"),
    ("[environment]\ncpus = true\n", "environment.cpus"),
    ("[environment]\nnetwork = \"bridge\"\n", "environment.network"),
    ("agent = 3\n", "[agent] must be a table"),
])
def test_load_task_names_file_and_bad_key(tmp_path, toml, expected):
    path = make_task(tmp_path, toml=toml)
    with pytest.raises(ValueError, match="task.toml") as err:
        load_task(path)
    assert expected in str(err.value)


@pytest.mark.parametrize("missing", ["instruction.md", "task.toml", "tests/test.sh"])
def test_load_task_missing_file(tmp_path, missing):
    path = make_task(tmp_path)
    (path / missing).unlink()
    with pytest.raises(ValueError, match=f"{missing}: missing"):
        load_task(path)


def test_builtin_tasks_load_sorted_with_full_layout():
    tasks = load_tasks(builtin_tasks_dir())
    assert len(tasks) >= 22
    assert [t.name for t in tasks] == sorted(t.name for t in tasks)
    for t in tasks:
        assert (t.solution_dir / "solve.sh").is_file(), t.name
        assert t.metadata.get("difficulty") in ("easy", "medium", "hard"), t.name


def test_format_check_and_cli_parser(capsys):
    results = [CheckResult("a", 1.0, 0.0, True), CheckResult("b", 0.0, 0.0, False, "oracle: reward 0")]
    text = format_check(results)
    assert text.splitlines()[-1] == "1/2 tasks pass" and "FAIL  b" in text
    parser = argparse.ArgumentParser()
    add_tasks_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tasks", "list", "-k", "git-"])
    assert args.func(args) == 0
    assert all(line.startswith("git-") for line in capsys.readouterr().out.splitlines())
    args = parser.parse_args(["tasks", "check", "--backend", "process"])
    assert (args.backend, args.dir, args.pattern) == ("process", None, None)


# ---------------------------------------------------------------------------------------------
# running, in bubblewrap sandboxes


@pytest.fixture(scope="module")
def backend():
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: terminal tasks need an isolated sandbox")
    from rollmill.sandbox.bwrap import BwrapBackend

    b = BwrapBackend()
    yield b
    b.close()


@pytest.mark.slow
def test_every_builtin_task_passes_its_check(backend):
    results = check_tasks(backend, load_tasks(builtin_tasks_dir()))
    assert all(r.passed for r in results), format_check(results)
    assert {(r.oracle_reward, r.empty_reward) for r in results} == {(1.0, 0.0)}
    assert backend.list() == []


def test_check_flags_a_verifier_that_rewards_doing_nothing(backend, tmp_path):
    make_task(tmp_path, name="lenient")
    make_task(tmp_path, name="no-oracle", test_sh="echo 0 > /logs/verifier/reward.txt")
    (tmp_path / "no-oracle" / "solution" / "solve.sh").write_text("exit 4\n")
    lenient, no_oracle = check_tasks(backend, load_tasks(tmp_path))
    assert not lenient.passed and (lenient.oracle_reward, lenient.empty_reward) == (1.0, 1.0)
    assert "no agent: reward 1" in lenient.message
    assert not no_oracle.passed and "solve.sh failed (exit code 4)" in no_oracle.message
    assert backend.list() == []


def test_verifier_timeout_gives_zero(backend, tmp_path):
    task = load_task(make_task(tmp_path, test_sh="echo 1 > /logs/verifier/reward.txt; sleep 30",
                               verifier_timeout=1.0))
    sid = start_task(backend, task)
    try:
        result = verify(backend, sid, task)
    finally:
        backend.destroy(sid)
    assert (result.reward, result.status, result.limit) == (0.0, Status.TIMEOUT, "verifier_timeout")


@pytest.mark.parametrize("test_sh, reward, status", [
    ("echo '{\"reward\": 0.25}' > /logs/verifier/reward.json", 0.25, Status.OK),
    ("true", 0.0, Status.ERROR),
    ("echo lots > /logs/verifier/reward.txt", 0.0, Status.ERROR),
])
def test_reward_files(backend, tmp_path, test_sh, reward, status):
    task = load_task(make_task(tmp_path, test_sh=test_sh))
    sid = start_task(backend, task)
    try:
        result = verify(backend, sid, task)
    finally:
        backend.destroy(sid)
    assert (result.reward, result.status) == (reward, status), result.message


def test_failed_setup_raises_infra_error_and_cleans_up(backend, tmp_path):
    task = load_task(make_task(tmp_path, name="broken", setup_sh="echo nope >&2; exit 3\n"))
    with pytest.raises(SandboxError, match="task broken: environment/setup.sh failed") as err:
        start_task(backend, task)
    assert err.value.status is Status.INFRA_ERROR and "nope" in str(err.value)
    assert backend.list() == []


def test_process_backend_is_refused(tmp_path):
    from rollmill.sandbox.process import ProcessBackend

    task = load_task(make_task(tmp_path))
    with pytest.raises(SandboxError, match="process backend"):
        start_task(ProcessBackend(root=tmp_path / "boxes"), task)
