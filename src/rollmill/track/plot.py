"""`rollmill plot RUN_DIR`: a PNG of training reward and held-out accuracy (or success) against step."""

from __future__ import annotations

from pathlib import Path

from rollmill.track.metrics import read_jsonl


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty: nothing to plot")
    out = out or run_dir / "curves.png"
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("reward/mean", "-"), ("accuracy/train", "--"), ("episode/success", "--")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax_r.plot(*zip(*pts), style, label=key)
    ax_r.set(title="training batch", xlabel="step")  # rewards may be negative (penalties)
    ax_r.legend(loc="lower right")
    for key in sorted({k for r in records for k in r if k in ("eval/accuracy", "eval/success") or k.startswith("eval/pass@")}):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax_a.plot(*zip(*pts), "o-", label=key)
    ax_a.set(title="held-out eval", xlabel="step", ylim=(-0.05, 1.05))
    if ax_a.lines:
        ax_a.legend(loc="lower right")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
