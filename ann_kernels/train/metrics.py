"""Per-exit evaluation, JSONL metric logs and plain-text tables.

Shapes: K exits, N samples, C classes. A multi-exit model maps ``x [N, ...]`` to a list of
K logits ``[N, C]`` (``ann_kernels.nn.MultiExitNetwork``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ann_kernels.ops.multi_exit_ce import multi_exit_cross_entropy


@dataclass
class ExitOutputs:
    """What every exit said about every sample of a dataset.

    - ``confidence``: [K, N] float32, max softmax probability.
    - ``prediction``: [K, N] int64, argmax class.
    - ``loss``: [K, N] float32, per-sample cross-entropy.
    - ``target``: [N] int64.
    """

    confidence: torch.Tensor
    prediction: torch.Tensor
    loss: torch.Tensor
    target: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """[K] float64: fraction of samples each exit classifies correctly."""
        return (self.prediction == self.target).double().mean(dim=1)

    @property
    def mean_loss(self) -> torch.Tensor:
        """[K] float64: mean cross-entropy of each exit."""
        return self.loss.double().mean(dim=1)


def _as_loader(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    # Its own generator: iterating never touches the global RNG (resume exactness).
    return DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def collect_exit_outputs(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 512,
    bf16: bool = False,
    device: torch.device | str = "cpu",
) -> ExitOutputs:
    """Run ``model`` (in eval mode; its training flag is restored after) over ``data`` of
    ``(x, y)`` pairs and return every exit's confidence / prediction / loss per sample."""
    was_training = model.training
    model.eval()
    conf, pred, loss, target = [], [], [], []
    try:
        for x, y in _as_loader(data, batch_size):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            out = multi_exit_cross_entropy([z.float() for z in logits], y)
            conf.append(out.confidence.cpu())
            pred.append(out.prediction.cpu())
            loss.append(out.per_sample.cpu())
            target.append(y.cpu())
    finally:
        model.train(was_training)
    if not target:
        raise ValueError("data: the dataset is empty, nothing to evaluate")
    return ExitOutputs(torch.cat(conf, 1), torch.cat(pred, 1), torch.cat(loss, 1), torch.cat(target))


def evaluate_exits(model: torch.nn.Module, data: Dataset | DataLoader, **kwargs) -> dict[str, list[float]]:
    """``{"acc": [K], "loss": [K]}`` of every exit over ``data`` (see :func:`collect_exit_outputs`)."""
    out = collect_exit_outputs(model, data, **kwargs)
    return {"acc": out.accuracy.tolist(), "loss": out.mean_loss.tolist()}


# ---------------------------------------------------------------- JSONL logs


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as one line (creating parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file, in order. A missing file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str | os.PathLike, keep: int) -> None:
    """Keep the first ``keep`` records (used when resuming from an earlier checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    records = read_jsonl(path)[:keep]
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# ---------------------------------------------------------------- tables


def format_flops(flops: float) -> str:
    """1234567 -> '1.23M' (per-sample FLOPs, SI prefixes)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.2f}{unit}"
    return f"{flops:.0f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def exit_table(
    flops: Sequence[float],
    columns: dict[str, Sequence[float] | Sequence[Sequence[float]]],
    *,
    percent: bool = True,
    markdown: bool = False,
    delta: tuple[str, str] | None = None,
) -> str:
    """A per-exit table: one row per exit with its cumulative FLOPs, then one column per run.

    ``columns[name]`` is either K accuracies (one run) or a list of runs, each K accuracies
    (printed as ``mean ± std`` over runs). ``delta=(a, b)`` adds a column ``b - a`` of the means.
    """
    names = list(columns)
    k = len(flops)
    stats: dict[str, list[tuple[float, float, int]]] = {}
    for name in names:
        col = columns[name]
        runs = [list(col)] if col and not isinstance(col[0], Iterable) else [list(r) for r in col]
        for r in runs:
            if len(r) != k:
                raise ValueError(f"columns[{name!r}]: expected {k} values (one per exit), got {len(r)}")
        stats[name] = [(*mean_std([r[i] for r in runs]), len(runs)) for i in range(k)]
    scale = 100.0 if percent else 1.0

    def cell(m, s, n):
        return f"{m * scale:.2f} ± {s * scale:.2f}" if n > 1 else f"{m * scale:.2f}"

    header = ["exit", "FLOPs"] + [f"{n} acc{' %' if percent else ''}" for n in names]
    if delta is not None:
        a, b = delta
        for d in delta:
            if d not in stats:
                raise ValueError(f"delta: {d!r} is not one of the columns {names}")
        header.append(f"{b} - {a}")
    rows = []
    for i in range(k):
        row = [str(i + 1), format_flops(flops[i])] + [cell(*stats[n][i]) for n in names]
        if delta is not None:
            row.append(f"{(stats[b][i][0] - stats[a][i][0]) * scale:+.2f}")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])
