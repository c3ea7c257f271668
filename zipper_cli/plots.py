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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _panel_grid(panels: dict[str, dict]):
    """One axes per panel that has data, side by side: (fig, [(ax, panel name, its series)]); (None, [])
    when no panel has data."""
    panels = {k: v for k, v in panels.items() if any(v.values())}
    if not panels:
        return None, []
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 4), dpi=100, squeeze=False)
    return fig, [(ax, panel, series) for ax, (panel, series) in zip(axes[0], panels.items())]


def _finish_panels(fig, grid, path: Path, title: str) -> None:
    """Common labels, then write the PNG (nothing is written when no panel has data)."""
    if not grid:
        return
    for ax, panel, _ in grid:
        ax.set_ylabel("WER")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def plot_wer_by_length(panels: dict[str, dict[str, list[dict]]], path: Path, title: str) -> None:
    """WER per reference-length bucket (the paper's Figure 2): one panel per task (e.g. ASR, TTS judged by ctc),
    one line per series; `panels[panel][series]` is metrics.wer_by_length's rows (lo, hi, wer, utterances)."""
    fig, grid = _panel_grid(panels)
    for ax, panel, series in grid:
        buckets = sorted({(b["lo"], b["hi"]) for rows in series.values() for b in rows})
        pos = {bk: i for i, bk in enumerate(buckets)}
        for label, rows in series.items():
            if rows:
                ax.plot([pos[(b["lo"], b["hi"])] for b in rows], [b["wer"] for b in rows], marker="o", label=label)
        ax.set_xticks(range(len(buckets)), [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in buckets])
        ax.set_xlabel("reference length (words)")
    _finish_panels(fig, grid, path, title)


def plot_wer_vs_aligned(panels: dict[str, dict[str, list[tuple[float, float, str]]]], path: Path, xlabel: str,
                        title: str) -> None:
    """WER against the amount of aligned fine-tuning data: one panel per task, one line per model family;
    `panels[panel][series]` is a list of (x, wer, point label). A log x axis when x spans more than 10x."""
    fig, grid = _panel_grid(panels)
    for ax, panel, series in grid:
        xs_all = [x for pts in series.values() for x, _, _ in pts]
        for label, pts in series.items():
            pts = sorted(pts)
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=label)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
    _finish_panels(fig, grid, path, title)
