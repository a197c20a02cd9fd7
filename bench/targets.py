"""Target mode of the loss benchmarks: the GPU targets of bench/README.md, measured at their own
shapes and dtypes and judged met or missed (`make gpu-check`, scripts/gpu_check.py; issue 22).

    python bench/targets.py --device cuda --out DIR --deadline-s 180   # on the GPU machine
    python bench/targets.py --dry-run --out DIR   # CPU stands in: miniature shapes, compile stubbed
    python bench/targets.py --list                # the table

``TARGETS`` is the table (one row per judged ratio). For each (op, shape, dtype) in it, in
table order, one process measures, fwd + bwd into fresh leaf gradients:
  ann_kernels    the public op (``ann_kernels.multi_exit_cross_entropy`` /
                 ``ann_kernels.multi_exit_linear_cross_entropy``)
  eager          logits op: ``sum_k w_k * F.cross_entropy(z_k, y)`` in the logits' dtype;
                 linear op: torchtune's early-exit loss (stack, unembed, CE, per-exit mean)
  torch.compile  the eager function, compiled once for the shape (static), warmed up
  liger          Liger-Kernel's CE per exit / fused linear CE on the K*N rows (when importable)
  hbm_floor      logits op: ``dst.copy_(src)`` over a logits-sized buffer (one read + one write)
Steps per shape: 1. inputs; 2. per provider: one warm-up step (compiles), then one step
between ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``: the extra peak
beyond the inputs and the gradients, written to the CSV at once; 3. the providers timed
interleaved (bench/common.py), the rows written at once. A shape whose turn comes too late for
the deadline is written as "not measured". ``judge`` turns the rows into one verdict per
target: met, missed, or not measured (and why).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ann_kernels  # noqa: E402
from bench.common import CSV_FIELDS, git_commit, time_interleaved, torchtune_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = {"logits": "multi_exit_cross_entropy", "linear": "multi_exit_linear_cross_entropy"}
PROVIDERS = {"logits": ("ann_kernels", "eager", "torch.compile", "liger", "hbm_floor"),
             "linear": ("ann_kernels", "eager", "torch.compile", "liger")}
METRICS = {"time": "fwd_bwd_ms", "extra_peak": "extra_peak_mb"}
CSV_NAME = "targets.csv"


@dataclasses.dataclass(frozen=True)
class Target:
    """ours / baseline <= bound, for ``metric`` of ``op`` at ``shape`` in ``dtype``.

    op: "logits" (shape (K, N, C)) or "linear" (shape (K, N, H, V)); metric: "time" (p50 of
    fwd + bwd) or "extra_peak" (CUDA allocator peak beyond inputs and gradients); baseline: a
    provider, or "logits_bytes" (K*N*V elements in ``dtype``: the logits the linear op must not
    materialise); says: the target in bench/README.md's words."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    metric: str
    baseline: str
    bound: float
    says: str

    @property
    def name(self) -> str:
        return f"{self.op} op {shape_str(self.shape)} {self.dtype} {self.metric} vs {self.baseline}"


LINEAR_SHAPES = ((4, 1024, 256, 32000), (8, 512, 256, 50257), (2, 2048, 512, 128256))
TARGETS: tuple[Target, ...] = (
    Target("logits", (4, 8192, 32000), "bf16", "time", "liger", 0.5, ">= 2x Liger"),
    Target("logits", (4, 8192, 32000), "bf16", "time", "eager", 1 / 3, ">= 3x eager"),
    Target("logits", (4, 8192, 32000), "bf16", "time", "hbm_floor", 1.3, "<= 1.3x the HBM floor"),
    *(target for shape in LINEAR_SHAPES for target in (
        Target("linear", shape, "bf16", "time", "torch.compile", 1.1, "<= 1.1x torch.compile's time"),
        Target("linear", shape, "bf16", "extra_peak", "logits_bytes", 0.1, "extra peak <= 0.1x the bf16 logits"))),
)


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def validate_targets(targets=TARGETS) -> list[tuple[str, tuple[int, ...], str]]:
    """Checks the table; returns the (op, shape, dtype) units to measure, in table order.
    Raises ValueError naming the bad row and field."""
    units = []
    seen = set()
    for i, t in enumerate(targets):
        where = f"TARGETS[{i}] ({t.name})"
        if t.op not in OPS:
            raise ValueError(f"{where}: op: expected one of {sorted(OPS)}, got {t.op!r}")
        rank = 3 if t.op == "logits" else 4
        if len(t.shape) != rank or not all(isinstance(s, int) and s > 0 for s in t.shape):
            raise ValueError(f"{where}: shape: expected {rank} positive ints, got {t.shape!r}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{where}: dtype: expected one of {sorted(DTYPES)}, got {t.dtype!r}")
        if t.metric not in METRICS:
            raise ValueError(f"{where}: metric: expected one of {sorted(METRICS)}, got {t.metric!r}")
        allowed = ("logits_bytes",) if t.metric == "extra_peak" and t.op == "linear" else PROVIDERS[t.op][1:]
        if t.baseline not in allowed:
            raise ValueError(f"{where}: baseline: expected one of {allowed}, got {t.baseline!r}")
        if not (isinstance(t.bound, (int, float)) and 0 < t.bound < math.inf):
            raise ValueError(f"{where}: bound: expected a positive finite ratio, got {t.bound!r}")
        key = (t.op, t.shape, t.dtype, t.metric, t.baseline)
        if key in seen:
            raise ValueError(f"{where}: listed twice")
        seen.add(key)
        if (t.op, t.shape, t.dtype) not in units:
            units.append((t.op, t.shape, t.dtype))
    return units


def stand_in_shape(op: str, shape) -> tuple[int, ...]:
    """The miniature shape the dry run measures on CPU in place of a GPU target shape."""
    return (shape[0], min(shape[1], 64), min(shape[2], 512)) if op == "logits" else \
        (shape[0], min(shape[1], 64), min(shape[2], 64), min(shape[3], 512))


# ---------------------------------------------------------------------------------------
# Providers: each returns (step, leaves); a step is one fwd + bwd into fresh gradients.


def eager_ce(logits, target, weights: list[float]):
    return sum(w * F.cross_entropy(z, target) for w, z in zip(weights, logits))


def make_inputs(op: str, shape, dtype, device):
    """Leaves (logits, or hidden states + the head's weight) made on the device in their dtype
    (a 1 G-element randn on the host would take longer than the measurement), the targets and
    host-side exit weights."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype).mul_(scale).requires_grad_()

    if op == "logits":
        k, n, c = shape
        leaves = [randn(n, c, scale=3.0) for _ in range(k)]
    else:
        k, n, h, c = shape
        leaves = [randn(n, h) for _ in range(k)] + [randn(c, h, scale=h**-0.5)]
    target = torch.randint(0, c, (n,), generator=gen, device=device)
    weights = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5
    return leaves, target, weights


def make_step(op: str, provider: str, leaves, target, weights, *, stub_compile: bool):
    """(step, note). Raises ImportError for a provider that is not installed."""
    note = ""
    if provider == "hbm_floor":
        src = torch.cat([z.detach().reshape(-1) for z in leaves])
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), "one read + one write of the logits"
    if provider == "liger":
        if leaves[0].device.type != "cuda":
            raise ImportError("Liger-Kernel runs on CUDA only")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ImportError("Liger-Kernel is not installed")
    weights_list = [float(w) for w in weights]
    weights_dev = weights.to(leaves[0].device)
    if op == "logits":
        if provider == "ann_kernels":
            def loss():
                return ann_kernels.multi_exit_cross_entropy(leaves, target, weights_dev).loss
        elif provider in ("eager", "torch.compile"):
            fn = eager_ce
            if provider == "torch.compile" and not stub_compile:
                torch._dynamo.reset()
                fn = torch.compile(eager_ce, dynamic=False)
            elif provider == "torch.compile":
                note = "dry run: eager stands in for torch.compile"

            def loss():
                return fn(leaves, target, weights_list)
        elif provider == "liger":
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss()

            def loss():
                return sum(w * liger(z, target) for w, z in zip(weights_list, leaves))
        else:
            raise ValueError(f"provider: unknown for the logits op: {provider!r}")
    else:
        hidden, weight = leaves[:-1], leaves[-1]
        if provider == "ann_kernels":
            def loss():
                return ann_kernels.multi_exit_linear_cross_entropy(hidden, weight, target, weights_dev).loss
        elif provider in ("eager", "torch.compile"):
            fn = torchtune_loss
            if provider == "torch.compile" and not stub_compile:
                torch._dynamo.reset()
                fn = torch.compile(torchtune_loss, dynamic=False)
            elif provider == "torch.compile":
                note = "dry run: eager stands in for torch.compile"

            def loss():
                return fn(hidden, weight, target, weights_dev)
        elif provider == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            k = len(hidden)

            def loss():  # mean over the K*N rows, times K: sum_k L_k with equal weights (same cost)
                return liger(weight, torch.cat(hidden), target.repeat(k)) * k
        else:
            raise ValueError(f"provider: unknown for the linear op: {provider!r}")

    def step():
        for t in leaves:
            t.grad = None
        loss().backward()
    return step, note


def synced(step, device):
    if device.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize()
    return run


def extra_peak_mb(step, leaves, device) -> float:
    """MB the CUDA allocator held at the peak of one step beyond the inputs and the gradients
    it leaves (NaN on CPU: the dry run has no allocator statistics)."""
    if device.type != "cuda":
        return float("nan")
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
    return (torch.cuda.max_memory_allocated() - before - grads) / 2**20


# ---------------------------------------------------------------------------------------
# Running: rows appended to the CSV as each is measured.


class RowWriter:
    """Long-format rows (bench/common.py CSV_FIELDS), each appended and flushed at once."""

    def __init__(self, path: str):
        self.path = path
        self.commit, self.torch = git_commit(), torch.__version__
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=CSV_FIELDS).writeheader()

    def add(self, op, provider, shape, dtype, metric, p20="", p50="", p80="", peak_mb="", notes="") -> None:
        row = dict(op=op, provider=provider, shape=shape_str(shape), metric=metric, p20=p20, p50=p50, p80=p80,
                   peak_mb=peak_mb, torch=self.torch, commit=self.commit,
                   timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), dtype=dtype,
                   notes=notes)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=CSV_FIELDS).writerow(row)
            handle.flush()


def measure_unit(op, shape, dtype_name, device, writer: RowWriter, *, stub_compile: bool,
                 with_compile: bool, seconds_per_provider: float = 1.5, min_reps: int = 5) -> None:
    """Steps 1-3 of the module docstring for one (op, shape, dtype)."""
    dtype = DTYPES[dtype_name]
    leaves, target, weights = make_inputs(op, shape, dtype, device)
    steps, single = {}, {}
    for provider in PROVIDERS[op]:
        if provider == "torch.compile" and not with_compile:
            writer.add(op, provider, shape, dtype_name, METRICS["time"], notes="not measured: no time left to compile")
            continue
        try:
            step, note = make_step(op, provider, leaves, target, weights, stub_compile=stub_compile)
            step = synced(step, device)
            step()  # warm-up: compiles, autotunes, fills the caching allocator
            peak = extra_peak_mb(step, leaves, device) if provider != "hbm_floor" else 0.0
            start = time.perf_counter()
            step()
            single[provider] = time.perf_counter() - start
        except ImportError as error:
            writer.add(op, provider, shape, dtype_name, METRICS["time"], notes=f"not measured: {error}")
            continue
        except Exception as error:  # noqa: BLE001  (OOM, compile failure: a row that says so)
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
            writer.add(op, provider, shape, dtype_name, METRICS["time"], notes=f"error: {message}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if math.isnan(peak):
            note = "; ".join(filter(None, [note, "no allocator statistics on CPU"]))
        writer.add(op, provider, shape, dtype_name, METRICS["extra_peak"], peak, peak, peak, peak, note)
        steps[provider] = step
    if not steps:
        return
    reps = int(min(60, max(min_reps, seconds_per_provider / max(single.values()))))
    timings = time_interleaved(steps, warmup=1, reps=reps, rounds=min(5, reps))
    for provider, timing in timings.items():
        writer.add(op, provider, shape, dtype_name, METRICS["time"], timing.p20 * 1e3, timing.p50 * 1e3,
                   timing.p80 * 1e3, notes=f"{reps} reps interleaved")
    del steps, leaves
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_targets(out_dir: str, device: torch.device, *, deadline_s: float, dry_run: bool = False,
                targets=TARGETS, compile_estimate_s: float = 60.0) -> str:
    """Measures every unit of ``targets`` (stand-in shapes on CPU when ``dry_run``); returns
    the CSV path. A unit that would start after the deadline is written as not measured; one
    without time for a compile is measured without torch.compile."""
    start = time.monotonic()
    writer = RowWriter(os.path.join(out_dir, CSV_NAME))
    for op, shape, dtype_name in tqdm(validate_targets(targets), desc="targets", unit="shape"):
        measured_shape = stand_in_shape(op, shape) if dry_run else shape
        left = deadline_s - (time.monotonic() - start)
        if left < 15:
            for provider in PROVIDERS[op]:
                writer.add(op, provider, shape, dtype_name, METRICS["time"],
                           notes=f"not measured: the deadline ({left:.0f} s left)")
            continue
        unit_start = time.monotonic()
        measure_unit(op, measured_shape, dtype_name, device, writer, stub_compile=dry_run,
                     with_compile=dry_run or left > compile_estimate_s + 15,
                     seconds_per_provider=0.0 if dry_run else 1.5, min_reps=2 if dry_run else 5)
        compile_estimate_s = max(20.0, time.monotonic() - unit_start)
        if dry_run:  # rows of a stand-in are filed under the target shape, marked as such
            rewrite_stand_in_rows(writer.path, op, measured_shape, shape)
    return writer.path


def rewrite_stand_in_rows(path: str, op: str, measured_shape, target_shape) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["op"] == op and row["shape"] == shape_str(measured_shape):
            row["shape"] = shape_str(target_shape)
            row["notes"] = "; ".join(filter(None, [f"dry run: CPU at {shape_str(measured_shape)}", row["notes"]]))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------
# Judging.


@dataclasses.dataclass
class Verdict:
    target: Target
    status: str  # "met", "missed", "not measured"
    ratio: float = float("nan")
    reason: str = ""
    ours: float = float("nan")  # ms or MB
    base: float = float("nan")

    def line(self) -> str:
        t = self.target
        label = {"met": "MET", "missed": "MISSED", "not measured": "NOT MEASURED"}[self.status]
        what = f"{t.op} op {shape_str(t.shape)} {t.dtype}, {t.says}"
        if math.isnan(self.ratio):
            return f"{label}: {what}: {self.reason}"
        if t.metric == "time":
            measured = f"{self.ours:.3g} ms = {self.ratio:.3g}x {t.baseline}'s {self.base:.3g} ms"
        else:
            measured = f"extra peak {self.ours:.4g} MB = {self.ratio:.3g}x the logits' {self.base:.4g} MB"
        return f"{label}: {what}: {measured} (target <= {t.bound:.3g}x)" + (f"; {self.reason}" if self.reason else "")


def read_rows(csv_path: str) -> list[dict]:
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _value(row: dict | None) -> float | None:
    if row is None or row.get("p50") in (None, ""):
        return None
    value = float(row["p50"])
    return None if math.isnan(value) else value


def judge(rows: list[dict], targets=TARGETS) -> list[Verdict]:
    """One verdict per target from the long-format rows of :func:`run_targets`."""
    index = {(r["op"], r["shape"], r.get("dtype", ""), r["metric"], r["provider"]): r for r in rows}
    verdicts = []
    for t in targets:
        key = (t.op, shape_str(t.shape), t.dtype, METRICS[t.metric])
        # An error row (written under the time metric) stands for every metric of the shape.
        ours_row = index.get((*key, "ann_kernels")) or index.get((*key[:3], METRICS["time"], "ann_kernels"))
        ours = _value(ours_row)
        if ours is None:
            why = (ours_row or {}).get("notes") or "no row (the targets phase did not reach it)"
            status = "missed" if "error:" in why else "not measured"
            verdicts.append(Verdict(t, status, reason=f"ann_kernels: {why}"))
            continue
        if t.baseline == "logits_bytes":
            k, n, _, v = t.shape
            base = k * n * v * DTYPES[t.dtype].itemsize / 2**20
            base_row = None
        else:
            base_row = index.get((*key, t.baseline))
            base = _value(base_row)
        if base is None or base <= 0:
            why = (base_row or {}).get("notes") or "no row"
            verdicts.append(Verdict(t, "not measured", reason=f"{t.baseline}: {why}"))
            continue
        ratio = ours / base
        notes = ours_row.get("notes", "") + (base_row or {}).get("notes", "")
        verdicts.append(Verdict(t, "met" if ratio <= t.bound else "missed", ratio,
                                "dry run: CPU stand-in, not a verdict" if "dry run" in notes else "", ours, base))
    return verdicts


def plot_verdicts(verdicts: list[Verdict], path: str) -> str | None:
    """A bar per measured target: ours / baseline on a log axis, with its bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [v for v in verdicts if v.status != "not measured"]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.4))
    names = [f"{v.target.op} {shape_str(v.target.shape)} {v.target.metric} / {v.target.baseline}" for v in shown]
    ax.barh(names, [v.ratio for v in shown], color=["tab:green" if v.status == "met" else "tab:red" for v in shown])
    ax.scatter([v.target.bound for v in shown], names, marker="|", s=300, color="black", label="target (<=)")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ours / baseline (lower is better)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "targets"))
    parser.add_argument("--deadline-s", type=float, default=600.0, help="no shape starts later than this")
    parser.add_argument("--dry-run", action="store_true", help="CPU stands in at miniature shapes; compile stubbed")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    units = validate_targets()
    if args.list:
        for t in TARGETS:
            print(f"{t.name:<60} <= {t.bound:.3g}  ({t.says})")
        print(f"{len(TARGETS)} targets in {len(units)} measured shapes")
        return 0
    device = torch.device("cpu" if args.dry_run else args.device)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes; the shared CPU stays free
    if device.type == "cuda" and not torch.cuda.is_available():
        print("targets: no CUDA device; use --dry-run", file=sys.stderr)
        return 2
    path = run_targets(args.out, device, deadline_s=args.deadline_s, dry_run=args.dry_run)
    verdicts = judge(read_rows(path))
    plot_verdicts(verdicts, os.path.join(args.out, "targets.png"))
    for verdict in verdicts:
        print(verdict.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
