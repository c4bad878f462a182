"""`rollmill plot RUN_DIR`: a PNG of a run's curves against step: training reward (RL runs), held-out
accuracy (or success, or preference accuracy), and whichever of loss, KL, entropy, response length,
gradient norm, preference margin and DDK domain weights the run logged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rollmill.track.metrics import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Panels drawn only when the run logged one of their keys: (title, keys); a key ending in "/" stands for
# every key it begins (one curve per domain). The keys are what the trainer, the critic, the KL controller,
# the pipelines and the SFT, DPO and distillation jobs write into metrics.jsonl; held-out ("eval/") keys
# share a panel with their training counterparts, so the gap between the two is visible.
OPTIONAL_PANELS = (
    ("loss", ("loss", "value_loss", "eval/loss")),
    ("KL", ("kl", "approx_kl", "kl/reward_side", "eval/kl")),
    ("entropy", ("entropy",)),
    ("response length (tokens)", ("response_length/mean", "episode/reply_tokens", "tail/response_length_p90")),
    ("grad norm", ("grad_norm", "critic/grad_norm")),
    ("preference margin", ("dpo/reward_margin", "eval/reward_margin")),
    ("DDK domain weight", ("ddk/weight/",)),
)
TRAIN_KEYS = (("reward/mean", "-"), ("accuracy/train", "--"), ("episode/success", "--"))
EVAL_KEYS = ("eval/accuracy", "eval/success", "eval/preference_accuracy", "eval/teacher_accuracy")
COLUMNS = 3  # panels per row once there are more than two


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of `run_dir`'s metrics.jsonl to `out` (default RUN_DIR/curves.png); returns the path."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty: nothing to plot")
    out = out or run_dir / "curves.png"
    build_figure(records, run_dir.name).savefig(out, dpi=100)
    return out


def build_figure(records: list[dict], title: str) -> Figure:
    """The matplotlib Figure of `records` (metrics.jsonl rows): one panel for the training batch (when the
    run logged a reward: SFT, DPO and distillation runs do not), one for held-out evals, then one per
    OPTIONAL_PANELS group the records hold.

    A bare Figure, not pyplot's: it needs no display backend (cluster nodes have none) and is freed
    with its last reference instead of living on in pyplot's registry of open figures."""
    from matplotlib.figure import Figure

    logged = sorted({k for r in records for k in r})
    train_keys = [(key, style) for key, style in TRAIN_KEYS if key in logged]
    extra = [(name, found) for name, keys in OPTIONAL_PANELS if (found := _matching(keys, logged))]
    evals = [(k, "o-") for k in logged if k in EVAL_KEYS or k.startswith("eval/pass@")]
    panels = ([("training batch", None, train_keys)] if train_keys else []) + [
        ("held-out eval", (-0.05, 1.05), evals)] + [
        (name, None, [(k, "o-" if k.startswith("eval/") else "-") for k in keys]) for name, keys in extra]
    n = len(panels)
    cols = n if n <= 2 else COLUMNS
    rows = -(-n // cols)
    fig = Figure(figsize=(5.5 * cols, 4 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax, (name, ylim, keys) in zip(axes, panels):
        for key, style in keys:
            _curve(ax, records, key, style)
        ax.set(title=name)  # rewards may be negative (penalties): only held-out rates get a fixed y range
        if ylim:
            ax.set_ylim(ylim)
        _finish(ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _matching(keys: tuple[str, ...], logged: list[str]) -> list[str]:
    """The logged keys a panel draws, in the panel's order; a key ending in "/" matches every key it begins."""
    return [k for want in keys for k in logged if k == want or (want.endswith("/") and k.startswith(want))]


def _curve(ax, records: list[dict], key: str, style: str) -> None:
    pts = [(r["step"], r[key]) for r in records if key in r]
    if pts:
        ax.plot(*zip(*pts), style, label=key)


def _finish(ax) -> None:
    """Step axis with whole-number ticks (steps are counts); the legend in small type at the spot that
    hides the fewest points, since curves fill different corners from run to run."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(loc="best", fontsize="small", framealpha=0.6)
