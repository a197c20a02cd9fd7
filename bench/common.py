"""Shared benchmark plumbing: timing with percentiles, peak-memory probes, long-format CSV."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV_FIELDS = ["op", "provider", "shape", "metric", "p20", "p50", "p80", "peak_mb", "torch", "commit", "timestamp",
              "dtype", "notes"]


@dataclass
class Timing:
    p20: float
    p50: float
    p80: float

    def scaled(self, factor: float) -> Timing:
        return Timing(self.p20 * factor, self.p50 * factor, self.p80 * factor)


def _percentiles(samples: list[float]) -> Timing:
    """p20 / p50 / p80 of per-call times (seconds)."""
    samples = sorted(samples)
    return Timing(*(samples[min(len(samples) - 1, int(q * len(samples)))] for q in (0.2, 0.5, 0.8)))


def time_fn(fn: Callable[[], object], *, warmup: int, reps: int, min_seconds: float = 0.0) -> Timing:
    """Per-call wall time in seconds (p20/p50/p80 over `reps` calls after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, reps: int, rounds: int = 7,
                     min_seconds: float = 0.0) -> dict[str, Timing]:
    """Like :func:`time_fn` for several candidates at once, interleaved: ``rounds`` rounds,
    each running every candidate for ``reps / rounds`` calls (and at least
    ``min_seconds / rounds`` seconds), so a change of machine load during the run hits
    every candidate alike and ratios taken from one run stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, -(-reps // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            done = 0
            while done < per_round or time.perf_counter() - start < min_seconds / rounds:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
                done += 1
    return {name: _percentiles(values) for name, values in samples.items()}


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Extra resident memory (MB) at the peak of one call of `fn`, above the resident set
    before it: resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return float("nan")
    before = _read_status_kb("VmRSS")
    fn()
    return (_read_status_kb("VmHWM") - before) / 1024.0


# The linear-loss baseline both linear benchmarks (bench_multi_exit_linear_ce.py, targets.py) compare with.
def torchtune_loss(hidden, weight, target, weights):
    """torchtune's early_exit_loss: stack, unembed, CE with reduction none, per-exit mean."""
    k = len(hidden)
    logits = F.linear(torch.stack(hidden), weight).reshape(-1, weight.shape[0])
    losses = F.cross_entropy(logits, target.repeat(k), reduction="none").view(k, -1)
    per_exit = losses.float().sum(-1) / (target != -100).sum()
    return (weights * per_exit).sum()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class CsvWriter:
    """Appends long-format rows (one metric per row) to bench/results/<name>.csv."""

    def __init__(self, name: str, out_dir: str | None = None):
        out_dir = out_dir or RESULTS_DIR
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"{name}.csv")
        self.commit = git_commit()
        self.timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.rows: list[dict] = []

    def add(self, op: str, provider: str, shape: str, metric: str, timing: Timing | None = None,
            value: float | None = None, peak_mb: float = float("nan"), dtype: str = "", notes: str = "") -> None:
        """One row; ``dtype`` and ``notes`` (e.g. which allocator effects a timing includes)
        are optional columns."""
        p20, p50, p80 = (timing.p20, timing.p50, timing.p80) if timing else (value, value, value)
        self.rows.append(dict(op=op, provider=provider, shape=shape, metric=metric, p20=p20, p50=p50, p80=p80,
                              peak_mb=peak_mb, torch=torch.__version__, commit=self.commit, timestamp=self.timestamp,
                              dtype=dtype, notes=notes))

    def write(self) -> str:
        # A file written with an older header gets a fresh one (columns must line up).
        if os.path.exists(self.path):
            with open(self.path, newline="") as handle:
                if handle.readline().strip().split(",") != CSV_FIELDS:
                    os.replace(self.path, self.path + ".old")
        new_file = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerows(self.rows)
        return self.path
