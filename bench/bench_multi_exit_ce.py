"""Fused multi-exit cross-entropy vs eager PyTorch vs torch.compile, forward + backward.

    python bench/bench_multi_exit_ce.py            # the four DESIGN.md shapes, fp32
    python bench/bench_multi_exit_ce.py --quick    # small shapes only (smoke run)

Writes long-format rows to bench/results/multi_exit_ce.csv, a plot to
bench/results/multi_exit_ce.png, and prints the ratios (all from this one run).
Providers, all doing loss + backward into fresh leaf gradients:
  ann_kernels    ann_kernels.multi_exit_cross_entropy (C++ kernel, C++ autograd)
  eager          sum_k w_k * F.cross_entropy(z_k, y)
  torch.compile  the same function under torch.compile (inductor)
  copy_floor     dst.copy_(src) over all logits (one read + one write of the logits)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ann_kernels  # noqa: E402

SHAPES = [(6, 128, 10), (6, 256, 100), (5, 256, 1000), (4, 1024, 32000)]
QUICK_SHAPES = [(6, 128, 10), (6, 256, 100)]


def eager_loss(logits: list[torch.Tensor], target: torch.Tensor, weights: list[float]) -> torch.Tensor:
    return sum(w * F.cross_entropy(z, target) for w, z in zip(weights, logits))


def make_step(provider: str, logits, target, weights_list, weights_tensor, compiled):
    def clear():
        for z in logits:
            z.grad = None

    if provider == "ann_kernels":
        def step():
            clear()
            ann_kernels.multi_exit_cross_entropy(logits, target, weights_tensor).loss.backward()
    elif provider == "eager":
        def step():
            clear()
            eager_loss(logits, target, weights_list).backward()
    elif provider == "torch.compile":
        def step():
            clear()
            compiled(logits, target, weights_list).backward()
    else:
        raise ValueError(provider)
    return step


def reps_for(numel: int) -> tuple[int, int]:
    """(warmup, reps): ~2e8 logits processed per measurement, between 5 and 300 calls."""
    reps = int(min(300, max(5, 2e8 // numel)))
    return max(3, reps // 10), reps


def run(shapes, providers, csv_writer: common.CsvWriter) -> list[dict]:
    summary = []
    compiled = torch.compile(eager_loss) if "torch.compile" in providers else None
    for num_exits, n, c in tqdm(shapes, desc="shapes"):
        shape = f"K={num_exits},N={n},C={c}"
        gen = torch.Generator().manual_seed(0)
        logits = [torch.randn(n, c, generator=gen).mul_(3).requires_grad_() for _ in range(num_exits)]
        target = torch.randint(0, c, (n,), generator=gen)
        weights_tensor = torch.rand(num_exits, generator=gen) + 0.5
        weights_list = weights_tensor.tolist()
        logits_mb = num_exits * n * c * 4 / 2**20
        warmup, reps = reps_for(num_exits * n * c)
        row = {"shape": shape, "logits_mb": logits_mb}
        src = torch.cat([z.detach().reshape(-1) for z in logits])
        dst = torch.empty_like(src)
        steps = {p: make_step(p, logits, target, weights_list, weights_tensor, compiled) for p in providers}
        steps["copy_floor"] = lambda: dst.copy_(src)
        # Interleaved rounds: every candidate sees the same machine load (ratios from one run).
        timings = common.time_interleaved(steps, warmup=warmup, reps=reps, min_seconds=1.0)
        for provider in providers:
            # Peak memory of one step from a cold start: no gradients held and the kernel's
            # gradient-buffer pool emptied, so the gradient buffers count as new memory.
            for z in logits:
                z.grad = None
            ann_kernels.ops.multi_exit_ce.empty_grad_cache()
            peak = common.peak_extra_mb(steps[provider])
            csv_writer.add("multi_exit_ce", provider, shape, "fwd_bwd_s", timings[provider], peak_mb=peak)
            row[provider] = timings[provider].p50
            row[provider + "_peak_mb"] = peak
        csv_writer.add("multi_exit_ce", "copy_floor", shape, "fwd_bwd_s", timings["copy_floor"], peak_mb=0.0)
        row["copy_floor"] = timings["copy_floor"].p50
        summary.append(row)
    return summary


def report(summary: list[dict], providers: list[str]) -> str:
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, fwd+bwd medians (us)"]
    header = f"{'shape':<22}" + "".join(f"{p:>15}" for p in providers) + f"{'copy_floor':>12}"
    header += f"{'vs eager':>10}{'vs compile':>12}{'/floor':>8}{'peak/logits':>13}"
    lines.append(header)
    for row in summary:
        line = f"{row['shape']:<22}" + "".join(f"{row[p] * 1e6:>15.1f}" for p in providers)
        line += f"{row['copy_floor'] * 1e6:>12.1f}"
        fused = row.get("ann_kernels")
        if fused:
            vs_eager = row["eager"] / fused if "eager" in row else float("nan")
            vs_compile = row["torch.compile"] / fused if "torch.compile" in row else float("nan")
            peak_ratio = row["ann_kernels_peak_mb"] / row["logits_mb"]
            line += f"{vs_eager:>9.2f}x{vs_compile:>11.2f}x{fused / row['copy_floor']:>7.2f}x{peak_ratio:>12.2f}x"
        lines.append(line)
    return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["shape"] for row in summary]
    xs = range(len(summary))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, baseline in enumerate(["eager", "torch.compile"]):
        ratios = [row.get(baseline, float("nan")) / row["ann_kernels"] for row in summary]
        ax.bar([x + (i - 0.5) * width for x in xs], ratios, width, label=f"speedup vs {baseline}")
    ax.axhline(4.0, color="k", linestyle="--", linewidth=1, label="target 4x")
    ax.set_xticks(list(xs), labels, rotation=10)
    ax.set_ylabel("speedup of ann_kernels (fwd+bwd, median)")
    ax.set_title(f"fused multi-exit CE, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    args = parser.parse_args(argv)
    providers = ["ann_kernels", "eager"] + ([] if args.no_compile else ["torch.compile"])
    writer = common.CsvWriter("multi_exit_ce")
    summary = run(QUICK_SHAPES if args.quick else SHAPES, providers, writer)
    print(report(summary, providers))
    print("csv:", writer.write())
    png = os.path.join(common.RESULTS_DIR, "multi_exit_ce.png")
    plot(summary, png)
    print("plot:", png)


if __name__ == "__main__":
    main()
