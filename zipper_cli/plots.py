"""PNG plots of training metrics (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def plot_metrics(rows: list[dict], path: Path, title: str, keys=("loss", "dev_loss")) -> None:
    """Train loss (and its running mean) and dev loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not pts:
            continue
        steps, vals = zip(*pts)
        style = {"marker": "o"} if key.startswith("dev") else {"alpha": 0.35}
        ax.plot(steps, vals, label=key, **style)
        if not key.startswith("dev") and len(vals) > 20:
            w = max(5, len(vals) // 50)
            smooth = [sum(vals[max(0, i - w + 1): i + 1]) / len(vals[max(0, i - w + 1): i + 1]) for i in range(len(vals))]
            ax.plot(steps, smooth, label=f"{key} (mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
