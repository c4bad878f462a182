"""What a user sees on the terminal and in logs: --version, `python -m rollmill`, a pipe closed early,
progress as a bar on a terminal and as one line per step in a log file, and the panels of curves.png."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import tiny_config_dict

from rollmill.cli import main
from rollmill.config import config_from_dict, dump_config
from rollmill.runtime import train
from rollmill.track import plot_run

# A short run: no eval before, one at the end; one checkpoint, at the end
QUICK = dict(train={"steps": 3}, eval={"before": False, "every": 0}, checkpoint={"every": 0})


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what was written to it."""

    def isatty(self) -> bool:
        return True


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"rollmill {version('rollmill')}\n"


def test_python_dash_m_rollmill_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "rollmill", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: rollmill") and "samples" in out.stdout, out.stderr


def test_closing_the_pipe_early_exits_quietly(tmp_path):
    # Far more than a pipe buffer (64 KiB), so `samples` is still writing when the reader leaves.
    row = {"step": 1, "prompt": "What is 1 + 1?", "answer": "2", "completion": "2" * 500, "reward": 1.0,
           "finish_reason": "stop"}
    (tmp_path / "samples.jsonl").write_text((json.dumps(row) + "\n") * 2000)
    proc = subprocess.Popen([sys.executable, "-m", "rollmill.cli", "samples", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("--- step 1")  # `| head -1`
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err


def test_a_log_file_gets_one_plain_line_per_step(tmp_path):
    # stderr redirected to a file, as in a cluster job: no bar redraws, one line per step instead
    config = tmp_path / "tiny.yaml"
    dump_config(config_from_dict(tiny_config_dict(tmp_path, log={"progress": True}, **QUICK)), config)
    with (tmp_path / "stderr.log").open("w") as err:
        out = subprocess.run([sys.executable, "-m", "rollmill.cli", "train", str(config), "--run-dir",
                              str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=err, text=True, timeout=600)
    log = (tmp_path / "stderr.log").read_bytes().decode()  # read_text() would turn each \r into \n
    assert out.returncode == 0, log
    assert "\r" not in log
    lines = [line for line in log.splitlines() if re.search(r" step \d+/3 ", line)]
    assert [re.search(r" step (\d+)/3 ", line)[1] for line in lines] == ["1", "2", "3"], log
    assert all(re.search(r"reward -?\d+\.\d{3}  loss -?\d+\.\d{4}  .*\d+\.\d\d s$", line) for line in lines), lines
    assert "eval/accuracy" in lines[-1]  # the last step's held-out eval


def test_on_a_terminal_log_lines_are_not_glued_onto_the_bar(tiny_cfg, tmp_path, monkeypatch, caplog):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    console = logging.StreamHandler(terminal)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    caplog.set_level(logging.INFO)
    root = logging.getLogger()
    root.addHandler(console)
    try:
        train(tiny_cfg(log={"progress": True}, **QUICK), tmp_path / "run")
        after = list(root.handlers)
    finally:
        root.removeHandler(console)
    shown = terminal.getvalue()
    assert "\r" in shown and "3/3" in shown, "a bar is drawn on a terminal"
    pieces = re.split(r"[\r\n]", shown)
    assert [p for p in pieces if "held-out" in p] == [p for p in pieces if p.startswith("LOG step 3: held-out")] != []
    assert "LOG step 1/3" not in shown, "with a bar, no per-step log lines"
    assert console in after and not any(type(h).__name__ == "_TqdmWriteHandler" for h in after), "handlers restored"


def test_progress_off_logs_one_line_per_step_even_on_a_terminal(monkeypatch, caplog):
    from rollmill.runtime.progress import StepProgress

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO)
    with StepProgress(total=2, initial=0, headline="eval/accuracy", bar=False) as progress:
        progress.step_done(1, {"step": 1, "reward/mean": 0.25, "loss": 0.5})
        progress.step_done(2, {"step": 2, "reward/mean": 0.5, "eval/accuracy": 0.75})
    assert terminal.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "rollmill.runtime.progress"]
    assert len(lines) == 2
    assert re.fullmatch(r"step 1/2  reward 0\.250  loss 0\.5000  \d+\.\d\d s", lines[0])
    assert re.fullmatch(r"step 2/2  reward 0\.500  eval/accuracy 0\.750  \d+\.\d\d s", lines[1])


def _records(**extra: float) -> list[dict]:
    """metrics.jsonl rows of a 12-step run: eval at 0, 6 and 12; `extra` keys on every training step."""
    rows = [{"step": 0, "eval/accuracy": 0.1}]
    for step in range(1, 13):
        rows.append({"step": step, "reward/mean": step / 12, **{k: v * step for k, v in extra.items()},
                     **({"eval/accuracy": step / 13} if step % 6 == 0 else {})})
    return rows


def _figure(records: list[dict]):
    from rollmill.track.plot import build_figure  # imported here: each test names its own missing piece

    return build_figure(records, "run")


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_plot_adds_a_panel_per_logged_metric_group(tmp_path):
    records = _records(**{"loss": 0.1, "value_loss": 0.2, "approx_kl": 0.01, "entropy": 1.0,
                          "response_length/mean": 20.0, "grad_norm": 0.5})
    fig = _figure(records)
    assert _titles(fig) == ["training batch", "held-out eval", "loss", "KL", "entropy", "response length (tokens)",
                            "grad norm"]
    loss = fig.axes[2]
    assert [line.get_label() for line in loss.lines] == ["loss", "value_loss"]
    for ax in fig.axes:
        assert all(tick == int(tick) for tick in ax.get_xticks()), "steps are whole numbers"
        legend = ax.get_legend()
        assert legend is not None and legend.get_texts()[0].get_fontsize() < 10
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_run(tmp_path).stat().st_size > 1000


def test_plot_without_training_diagnostics_keeps_its_two_panels():
    fig = _figure(_records())
    assert _titles(fig) == ["training batch", "held-out eval"]
    assert [line.get_label() for line in fig.axes[1].lines] == ["eval/accuracy"]


def test_plot_of_a_run_without_rewards_draws_its_held_out_loss_and_each_domains_weight():
    rows = [{"step": 0, "eval/accuracy": 0.0, "eval/loss": 2.0}]
    for step in range(1, 7):  # what a DDK distillation run logs: no reward, a weight per domain
        rows.append({"step": step, "loss": 2.0 / step, "ddk/weight/add": 0.5 - step / 100,
                     "ddk/weight/max": 0.5 + step / 100, **({"eval/loss": 1.0, "eval/accuracy": 0.5} if step == 6 else {})})
    fig = _figure(rows)
    assert _titles(fig) == ["held-out eval", "loss", "DDK domain weight"]
    loss, weights = fig.axes[1], fig.axes[2]
    assert [line.get_label() for line in loss.lines] == ["loss", "eval/loss"]
    assert list(loss.lines[1].get_xdata()) == [0, 6] and loss.lines[1].get_marker() == "o"
    assert [line.get_label() for line in weights.lines] == ["ddk/weight/add", "ddk/weight/max"]
    assert list(weights.lines[1].get_ydata()) == [0.5 + s / 100 for s in range(1, 7)]
