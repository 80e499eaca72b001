"""Loss curves from run folders' metrics.jsonl (matplotlib, Agg backend: no display needed).
Figures are written whole or not at all (`save_figure`)."""

from __future__ import annotations

import io
from pathlib import Path

from .durable import write_atomic
from .metrics import read_metrics, train_losses


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure atomically (rendered in memory, then durable.write_atomic: a kill
    never leaves half an image) and close it; the format follows the file's extension."""
    import matplotlib.pyplot as plt

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=path.suffix.lstrip(".") or None)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), "plot.figure")
    return path


def _smooth(values: list[float], n: int) -> list[float]:
    if n <= 1:
        return values
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(runs, out: str | Path, *, title: str | None = None, smooth: int = 1) -> Path:
    """One figure of the runs' training (smoothed over `smooth` logged points) and validation
    losses. A run that has logged no loss yet is an error naming it, never an empty curve."""
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"--smooth: must be a positive integer (1: no smoothing), got {smooth!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        records = read_metrics(run)
        name = Path(run).name
        color = colors[i % len(colors)]
        train = sorted(train_losses(records).items())
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if not train and not val:
            plt.close(fig)
            raise ValueError(f"{run}: its metrics.jsonl holds no loss yet (the run has not logged a step)")
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, _smooth(list(ys), smooth), color=color, label=f"{name} train")
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)
