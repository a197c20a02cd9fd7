"""PNG plots of anytime training (matplotlib Figure + Agg canvas: no display, no pyplot).

- :func:`plot_anytime`: accuracy vs cumulative per-sample FLOPs, one marker per exit and
  one line per run / weighting (with a ±std band when several seeds are given).
- :func:`plot_weights`: the loss weights of every exit over training steps (AdaLoss's
  weights move; static schemes are flat lines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ann_kernels.train.metrics import mean_std


def _figure(figsize):
    """A matplotlib Figure drawn by Agg, without pyplot (no global backend switch, no
    display); matplotlib is imported on first use (it takes ~1 s)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    return fig, fig.subplots()


def plot_anytime(
    runs: dict[str, tuple[Sequence[float], Sequence[float] | Sequence[Sequence[float]]]],
    path: str | os.PathLike,
    *,
    title: str = "Anytime prediction",
    ylabel: str = "test accuracy (%)",
) -> Path:
    """``runs[label] = (flops [K], acc)`` where ``acc`` is K accuracies in [0, 1] or a list
    of such per seed (plotted as mean with a ±1 std band). Writes a PNG; returns its path."""
    if not runs:
        raise ValueError("runs: nothing to plot (empty dict)")
    fig, ax = _figure((6.4, 4.4))
    for label, (flops, acc) in runs.items():
        k = len(flops)
        seeds = [list(acc)] if acc and not isinstance(acc[0], (list, tuple)) else [list(a) for a in acc]
        for s in seeds:
            if len(s) != k:
                raise ValueError(f"runs[{label!r}]: {len(s)} accuracies for {k} exits")
        stats = [mean_std([s[i] for s in seeds]) for i in range(k)]
        x = [f / 1e6 for f in flops]
        mean = [100 * m for m, _ in stats]
        line, = ax.plot(x, mean, marker="o", label=label if len(seeds) == 1 else f"{label} (n={len(seeds)})")
        if len(seeds) > 1:
            lo = [100 * (m - s) for m, s in stats]
            hi = [100 * (m + s) for m, s in stats]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("cumulative cost per sample (MFLOPs)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_weights(
    steps: Sequence[int],
    weights: Sequence[Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "Loss weights over training",
) -> Path:
    """``weights[t]`` are the K exit weights in use at ``steps[t]``. Writes a PNG."""
    if len(steps) != len(weights) or not steps:
        raise ValueError(f"steps / weights: expected equal, non-zero lengths, got {len(steps)} and {len(weights)}")
    k = len(weights[0])
    from matplotlib import colormaps

    fig, ax = _figure((6.4, 4.0))
    cmap = colormaps["viridis"]
    for j in range(k):
        ax.plot(steps, [w[j] for w in weights], color=cmap(j / max(k - 1, 1)), label=f"exit {j + 1}")
    ax.set_xlabel("training step")
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize="small")
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path
