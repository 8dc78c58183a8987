"""Plots people compare: block importance bars, speed against batch size. matplotlib is imported here only."""

from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_block_scores(scores, path: str | Path, removed: list[int] | None = None) -> Path | None:
    """One bar per block; removed blocks in red, protected (unscored or never candidates) hatched grey."""
    plt = _plt()
    if plt is None:
        return None
    n = len(scores.scores)
    removed = set(removed if removed is not None else scores.removal_order[: max(1, round(0.2 * n))])
    fig, ax = plt.subplots(figsize=(max(6, n * 0.3), 3.5))
    vals = [s if s is not None else 0.0 for s in scores.scores]
    for i, v in enumerate(vals):
        if i not in scores.candidates:
            ax.bar(i, v, color="#cccccc", hatch="//", edgecolor="#888888")
        else:
            ax.bar(i, v, color="#d62728" if i in removed else "#1f77b4")
    if scores.criterion == "ppl" and scores.base_ppl:
        ax.axhline(scores.base_ppl, color="k", lw=0.8, ls="--", label=f"full model PPL {scores.base_ppl:.2f}")
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("block")
    label = {
        "ppl": "PPL without the block",
        "taylor": "Taylor |w·dL/dw|",
        "magnitude": "sum |w|",
        "bi": "block influence",
    }
    ax.set_ylabel(label.get(scores.criterion, scores.criterion))
    mode = " (iterative, first step)" if scores.iterative else ""
    ax.set_title(f"Block importance: {scores.criterion}{mode}; red = removed, grey = protected", fontsize=10)
    ax.set_xticks(range(n))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
