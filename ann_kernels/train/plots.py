"""PNG plots of anytime training (matplotlib Figure + Agg canvas: no display, no pyplot).

- :func:`plot_anytime`: accuracy vs cumulative per-sample FLOPs, one marker per exit and
  one line per run / weighting (with a ±std band when several seeds are given), reference
  points (OPT at its trained exit) and an optional difference panel.
- :func:`plot_weights`: the loss weights of every exit over training steps (AdaLoss's
  weights move; static schemes are flat lines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ann_kernels.train.metrics import mean_std


def _figure(figsize, **subplots):
    """A matplotlib Figure drawn by Agg, without pyplot (no global backend switch, no
    display), and its axes (``Figure.subplots(**subplots)``); matplotlib is imported on
    first use (it takes ~1 s)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    return fig, fig.subplots(**subplots)


def _per_exit_stats(label: str, k: int, acc) -> tuple[list[list[float]], list[tuple[float, float]]]:
    """``acc``: K accuracies or a list of such per seed -> (per-seed lists, per-exit (mean, std))."""
    seeds = [list(acc)] if acc and not isinstance(acc[0], (list, tuple)) else [list(a) for a in acc]
    for s in seeds:
        if len(s) != k:
            raise ValueError(f"runs[{label!r}]: {len(s)} accuracies for {k} exits")
    return seeds, [mean_std([s[i] for s in seeds]) for i in range(k)]


def anytime_figure(
    runs: dict[str, tuple[Sequence[float], Sequence[float] | Sequence[Sequence[float]]]],
    *,
    references: dict[str, tuple[float, float | Sequence[float]]] | None = None,
    delta: tuple[str, str] | None = None,
    title: str = "Anytime prediction",
    ylabel: str = "test accuracy (%)",
):
    """The Figure of :func:`plot_anytime` (same arguments, no file)."""
    if not runs:
        raise ValueError("runs: nothing to plot (empty dict)")
    show_delta = delta is not None and delta[0] in runs and delta[1] in runs
    if show_delta:
        fig, (ax, dax) = _figure((6.4, 5.8), nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    else:
        (fig, ax), dax = _figure((6.4, 4.4)), None
    # 1. One line per run (mean over seeds, ±1 std band); remember the y range they span.
    shown: list[float] = []
    stats_of = {}
    for i, (label, (flops, acc)) in enumerate(runs.items()):
        k = len(flops)
        seeds, stats = _per_exit_stats(label, k, acc)
        stats_of[label] = (seeds, stats)
        x = [f / 1e6 for f in flops]
        mean = [100 * m for m, _ in stats]
        line, = ax.plot(x, mean, marker="o", linestyle="-" if i % 2 == 0 else "--",
                        label=label if len(seeds) == 1 else f"{label} (n={len(seeds)})")
        lo = [100 * (m - s) for m, s in stats]
        hi = [100 * (m + s) for m, s in stats]
        if len(seeds) > 1:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        shown += lo + hi
    # 2. References: one point each (e.g. OPT at the one exit it trains), a star and a dotted line.
    for label, (flop, acc) in (references or {}).items():
        values = [acc] if isinstance(acc, (int, float)) else list(acc)
        if not values:
            raise ValueError(f"references[{label!r}]: no accuracy")
        m, sd = mean_std(values)
        ax.axhline(100 * m, color="black", linestyle=":", linewidth=1)
        ax.errorbar([flop / 1e6], [100 * m], yerr=[100 * sd] if len(values) > 1 else None, marker="*",
                    markersize=13, color="black", linestyle="none",
                    label=label if len(values) == 1 else f"{label} (n={len(values)})")
        shown += [100 * (m - sd), 100 * (m + sd)]
    # 3. Zoom the accuracy axis to what is drawn (5% margin each side).
    lo, hi = min(shown), max(shown)
    pad = max(0.05 * (hi - lo), 0.25)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    # 4. The difference panel: delta[1] - delta[0] per exit, in points (paired over seeds when both
    #    runs have the same number of seeds), so sub-point gaps are visible at a glance.
    if show_delta:
        (seeds_a, _), (seeds_b, _) = stats_of[delta[0]], stats_of[delta[1]]
        flops = runs[delta[0]][0]
        x = [f / 1e6 for f in flops]
        if len(seeds_a) == len(seeds_b):
            diffs = [mean_std([100 * (b[i] - a[i]) for a, b in zip(seeds_a, seeds_b)]) for i in range(len(x))]
        else:
            diffs = [(100 * (stats_of[delta[1]][1][i][0] - stats_of[delta[0]][1][i][0]), 0.0)
                     for i in range(len(x))]
        dax.axhline(0, color="grey", linewidth=1)
        dax.margins(y=0.3)
        dax.errorbar(x, [d for d, _ in diffs], yerr=[s for _, s in diffs] if len(seeds_a) > 1 else None,
                     marker="o", color="black", capsize=3)
        for xi, (d, _) in zip(x, diffs):
            dax.annotate(f"{d:+.2f}", (xi, d), textcoords="offset points", xytext=(5, 5), ha="left",
                         fontsize="x-small")
        dax.set_ylabel(f"{delta[1]} - {delta[0]}\n(points)")
        dax.grid(alpha=0.3)
        dax.set_xlabel("cumulative cost per sample (MFLOPs)")
    else:
        ax.set_xlabel("cumulative cost per sample (MFLOPs)")
    fig.tight_layout()
    return fig


def plot_anytime(
    runs: dict[str, tuple[Sequence[float], Sequence[float] | Sequence[Sequence[float]]]],
    path: str | os.PathLike,
    *,
    references: dict[str, tuple[float, float | Sequence[float]]] | None = None,
    delta: tuple[str, str] | None = None,
    title: str = "Anytime prediction",
    ylabel: str = "test accuracy (%)",
) -> Path:
    """``runs[label] = (flops [K], acc)`` where ``acc`` is K accuracies in [0, 1] or a list
    of such per seed (plotted as mean with a ±1 std band). ``references[label] = (flops, acc)``
    is one point (``acc`` a float or one per seed), e.g. OPT at the only exit it trains: a star
    and a dotted horizontal line, not a curve of untrained exits. The accuracy axis is zoomed
    to what is drawn. ``delta = (a, b)``, when both are in ``runs``, adds a panel of ``b - a``
    per exit in points (mean ± std of the per-seed differences). Writes a PNG; returns its path."""
    fig = anytime_figure(runs, references=references, delta=delta, title=title, ylabel=ylabel)
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
