"""`rollmill plot RUN_DIR`: a PNG of a run's curves against step: training reward, held-out accuracy (or
success), and whichever of loss, KL, entropy, response length and gradient norm the run logged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rollmill.track.metrics import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Panels drawn only when the run logged one of their keys: (title, keys). The keys are what the trainer,
# the critic, the KL controller and the pipelines write into metrics.jsonl.
OPTIONAL_PANELS = (
    ("loss", ("loss", "value_loss")),
    ("KL", ("kl", "approx_kl", "kl/reward_side")),
    ("entropy", ("entropy",)),
    ("response length (tokens)", ("response_length/mean", "episode/reply_tokens", "tail/response_length_p90")),
    ("grad norm", ("grad_norm", "critic/grad_norm")),
)
TRAIN_KEYS = (("reward/mean", "-"), ("accuracy/train", "--"), ("episode/success", "--"))
COLUMNS = 3  # panels per row once there are more than the two always drawn


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of `run_dir`'s metrics.jsonl to `out` (default RUN_DIR/curves.png); returns the path."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty: nothing to plot")
    out = out or run_dir / "curves.png"
    build_figure(records, run_dir.name).savefig(out, dpi=100)
    return out


def build_figure(records: list[dict], title: str) -> Figure:
    """The matplotlib Figure of `records` (metrics.jsonl rows): one panel for the training batch, one for
    held-out evals, then one per OPTIONAL_PANELS group the records hold.

    A bare Figure, not pyplot's: it needs no display backend (cluster nodes have none) and is freed
    with its last reference instead of living on in pyplot's registry of open figures."""
    from matplotlib.figure import Figure

    logged = {k for r in records for k in r}
    extra = [(name, [k for k in keys if k in logged]) for name, keys in OPTIONAL_PANELS if logged.intersection(keys)]
    n = 2 + len(extra)
    cols = 2 if n == 2 else COLUMNS
    rows = -(-n // cols)
    fig = Figure(figsize=(5.5 * cols, 4 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    ax_train, ax_eval, *ax_extra = axes[:n]
    for key, style in TRAIN_KEYS:
        _curve(ax_train, records, key, style)
    ax_train.set(title="training batch")  # rewards may be negative (penalties): no fixed y range
    evals = sorted(k for k in logged if k in ("eval/accuracy", "eval/success") or k.startswith("eval/pass@"))
    for key in evals:
        _curve(ax_eval, records, key, "o-")
    ax_eval.set(title="held-out eval", ylim=(-0.05, 1.05))
    for ax, (name, keys) in zip(ax_extra, extra):
        for key in keys:
            _curve(ax, records, key, "-")
        ax.set(title=name)
    for ax in axes[:n]:
        _finish(ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


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
