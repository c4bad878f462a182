import subprocess
import sys

import pytest

from rollmill.checks import check_config, load_run_config
from rollmill.config import ConfigError, RunConfig, default_config_path, load_config, parse_override


def test_default_config_is_the_main_job():
    cfg = load_config()
    assert cfg.model.source == "smollm2"
    assert cfg.algorithm.name == "grpo"
    assert default_config_path().is_file()


def test_overrides_are_parsed_as_yaml_and_applied():
    assert parse_override("train.lr=3e-5") == (["train", "lr"], 3e-5)
    assert parse_override("rollout.sampling.stop=[a, b]") == (["rollout", "sampling", "stop"], ["a", "b"])
    cfg = load_config(None, ["train.lr=3e-5", "rollout.group_size=4", "task.name=add_1digit"])
    assert cfg.train.lr == 3e-5 and cfg.rollout.group_size == 4 and cfg.task.name == "add_1digit"


def test_misspelled_key_names_the_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.learning_rate=1e-5"])
    msg = str(err.value)
    assert "train.learning_rate" in msg and "'lr'" in msg and "'micro_batch_size'" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=many"])
    assert "train.steps" in str(err.value) and "'many'" in str(err.value)


def test_unknown_algorithm_lists_allowed_names():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm.name=grpoo"])
    assert "algorithm.name" in str(err.value) and "'grpo'" in str(err.value)


def test_unknown_reward_and_loss_names_are_rejected():
    with pytest.raises(ConfigError, match="first_integer"):
        load_run_config(None, ["reward.functions=[{name: nope}]"])
    with pytest.raises(ConfigError, match="ppo_clip"):
        load_run_config(None, ["algorithm.loss=mystery"])


def test_registry_checks_report_every_problem_by_key():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["algorithm.loss=mystery", "reward.functions=[{name: nope}]", "env.name=frozenlak"])
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:"
    assert lines[1].startswith("  algorithm.loss = 'mystery': unknown policy loss 'mystery'; allowed: [")
    assert lines[2].startswith("  reward.functions.0.name = 'nope': unknown reward function 'nope'; allowed: [")
    assert lines[3].startswith("  env.name = 'frozenlak': unknown env 'frozenlak'; allowed: [")
    cfg = load_config(None, ["algorithm.loss=mystery"])  # the config package alone knows no registry
    with pytest.raises(ConfigError, match="algorithm.loss"):
        check_config(cfg)


def test_preset_fills_defaults_but_explicit_keys_win():
    cfg = RunConfig.model_validate({"algorithm": {"name": "dr_grpo"}})
    assert cfg.algorithm.advantage == "dr_grpo" and cfg.algorithm.loss_agg == "seq-mean-token-sum-norm"
    cfg = RunConfig.model_validate({"algorithm": {"name": "dr_grpo", "loss_agg": "token-mean"}})
    assert cfg.algorithm.loss_agg == "token-mean"


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "allowed keys"),
    ("algorithm.loss=nope", "unknown policy loss 'nope'"),
])
def test_cli_rejects_bad_config_before_loading_a_model(override, message):
    out = subprocess.run(
        [sys.executable, "-m", "rollmill.cli", "train", "--set", override],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert override.split("=")[0] in out.stderr and message in out.stderr
    assert "Loading weights" not in out.stderr


def test_reward_kwargs_are_checked_against_the_function():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["reward.functions=[{name: format, kwargs: {patern: x}}]"])
    assert "patern" in str(err.value) and "pattern" in str(err.value)


def test_config_package_imports_no_other_rollmill_module():
    # Registries import the config; the config importing them back would be a cycle.
    code = "import sys, rollmill.config; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    outside = [m for m in out.stdout.split()
               if m.startswith("rollmill.") and m != "rollmill.config" and not m.startswith("rollmill.config.")]
    assert not outside


def test_settings_that_cannot_learn_or_never_apply_are_refused(tiny_cfg, tmp_path):
    from rollmill.checks import check_config

    with pytest.raises(ConfigError, match="rollout.group_size = 1.*every advantage is 0"):
        check_config(tiny_cfg(rollout={"group_size": 1}))
    check_config(tiny_cfg(rollout={"group_size": 1}, algorithm={"advantage": "reinforce_pp"}))  # a batch baseline
    with pytest.raises(ConfigError, match="warmup_steps=50 > train.steps=4"):
        tiny_cfg(train={"steps": 4, "warmup_steps": 50})
    with pytest.raises(ConfigError, match="mini_batch_size=64 is larger than the batch.*8 samples"):
        tiny_cfg(train={"mini_batch_size": 64})
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
