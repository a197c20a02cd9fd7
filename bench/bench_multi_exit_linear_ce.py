"""Fused linear + multi-exit cross-entropy vs the ways early-exit LMs compute it today,
forward + backward into hidden states and the shared head [V, H].

    python bench/bench_multi_exit_linear_ce.py                       # (4,1024,256,32000) fp32
    python bench/bench_multi_exit_linear_ce.py --shapes all --dtypes float32 bfloat16
    python bench/bench_multi_exit_linear_ce.py --quick --device cuda --out DIR

Providers (all: loss = sum_k w_k CE_k, then backward into fresh leaf gradients):
  fused           ann_kernels.multi_exit_linear_cross_entropy (never materialises K x N x V)
  torchtune       stack the K hidden states, unembed, CE over [K*N, V] (torchtune's
                  early_exit_loss), eager
  eager_per_exit  sum_k w_k F.cross_entropy(F.linear(h_k, W), y)
  torch.compile   the torchtune function under torch.compile (static shapes, reset and
                  compiled fresh for every shape)
  logits_op       F.linear per exit, then ann_kernels.multi_exit_cross_entropy (the fused
                  op on materialised logits)
  liger           Liger-Kernel's LigerFusedLinearCrossEntropyLoss on the K*N stacked rows
                  (GPU only, when importable)
  gemm_floor      the three matmuls alone (logits = H W^T, dH = G W, dW = G^T H on
                  preallocated buffers): the physical floor of any exact method

Times are interleaved (bench/common.py); each provider's extra peak memory is measured in
a fresh process (CPU: VmHWM over RSS before the step; CUDA: max_memory_allocated over the
inputs) and reported beyond the .grad buffers (hidden and W gradients, which every
provider allocates), as a fraction of the K x N x V logits in the input dtype.
Targets (issue 20, CPU): bf16 / fp16 <= 0.9x torch.compile and <= 0.75x eager
(torchtune-style), extra peak <= 0.15x the logits; fp32 <= 0.95x torch.compile.

    python bench/bench_multi_exit_linear_ce.py --shapes s1 s3 --dtypes bfloat16 float32 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ann_kernels  # noqa: E402

SHAPES = {"s1": (4, 1024, 256, 32000), "s2": (8, 512, 256, 50257), "s3": (2, 2048, 512, 128256)}
QUICK_SHAPES = [(4, 256, 128, 8192)]
PROVIDERS = ["fused", "torchtune", "eager_per_exit", "torch.compile", "logits_op", "liger"]


def eager_per_exit(hidden, weight, target, weights):
    return sum(weights[k] * F.cross_entropy(F.linear(h, weight), target) for k, h in enumerate(hidden))


def make_inputs(shape, dtype, device, seed=0):
    k, n, h, v = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_() for _ in range(k)]
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    weights = (torch.rand(k, generator=gen) + 0.5).to(device)
    return hidden, weight, target, weights


def make_step(provider, hidden, weight, target, weights):
    leaves = [*hidden, weight]

    def clear():
        for t in leaves:
            t.grad = None

    if provider == "fused":
        def loss():
            return ann_kernels.multi_exit_linear_cross_entropy(hidden, weight, target, weights).loss
    elif provider == "torchtune":
        def loss():
            return common.torchtune_loss(hidden, weight, target, weights)
    elif provider == "eager_per_exit":
        def loss():
            return eager_per_exit(hidden, weight, target, weights)
    elif provider == "torch.compile":
        torch._dynamo.reset()
        compiled = torch.compile(common.torchtune_loss, dynamic=False)

        def loss():
            return compiled(hidden, weight, target, weights)
    elif provider == "logits_op":
        def loss():
            return ann_kernels.multi_exit_cross_entropy([F.linear(h, weight) for h in hidden], target, weights).loss
    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        n = hidden[0].shape[0]

        def loss():  # mean over K*N rows; rescale to sum_k w_k L_k with equal w (cost is the same)
            return liger(weight, torch.cat(hidden), target.repeat(len(hidden))) * len(hidden) * (n / n)
    else:
        raise ValueError(provider)

    def step():
        clear()
        loss().backward()
    return step


def gemm_floor_step(shape, dtype, device):
    k, n, h, v = shape
    x = torch.randn(k * n, h, device=device, dtype=dtype)
    w = torch.randn(v, h, device=device, dtype=dtype)
    logits = torch.empty(k * n, v, device=device, dtype=dtype)
    dh = torch.empty(k * n, h, device=device, dtype=dtype)
    dw = torch.empty(v, h, device=device, dtype=dtype)

    def step():
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=dh)
        torch.mm(logits.t(), x, out=dw)
    return step


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_child(provider, shape, dtype, device) -> float:
    """Run in a fresh process: extra peak MB of one fwd+bwd step after one warm-up step."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    inputs = make_inputs(shape, dtype, device)
    step = make_step(provider, *inputs)
    step()  # warm-up (compilation, first-touch of lazily created state)
    for t in (*inputs[0], inputs[1]):
        t.grad = None
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return common.peak_extra_mb(step)


def measure_peak(provider, shape, dtype, device) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", provider, "--device", device,
           "--child-shape", ",".join(map(str, shape)), "--dtypes", str(dtype).replace("torch.", "")]
    # A fixed mmap threshold: every buffer >= 128 KiB is its own mapping, returned to the OS
    # when freed, so the warm-up step's freed buffers cannot hide the measured step's peak
    # (glibc's default threshold grows to 32 MiB and keeps such blocks in the heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    if out.returncode != 0:
        print(f"  peak of {provider} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def available(provider, device) -> bool:
    if provider == "liger":
        if device != "cuda":
            return False
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return False
    return True


def run(shapes, dtypes, providers, device, writer, reps):
    summary = []
    for shape in shapes:
        for dtype in dtypes:
            k, n, h, v = shape
            label = f"K={k},N={n},H={h},V={v},{str(dtype).replace('torch.', '')}"
            elem = torch.empty((), dtype=dtype).element_size()
            logits_mb = k * n * v * elem / 2**20
            grads_mb = (k * n * h + v * h) * elem / 2**20  # the .grad buffers of hidden and W
            print(f"{label}: logits in the input dtype would be {logits_mb:.0f} MB", flush=True)
            inputs = make_inputs(shape, dtype, device)
            steps = {p: make_step(p, *inputs) for p in providers}
            steps["gemm_floor"] = gemm_floor_step(shape, dtype, device)
            if device == "cuda":
                steps = {p: (lambda f: (lambda: (f(), torch.cuda.synchronize())))(f) for p, f in steps.items()}
            timings = common.time_interleaved(steps, warmup=1, reps=reps, rounds=reps)
            row = {"shape": label, "logits_mb": logits_mb, "dtype": str(dtype).replace("torch.", "")}
            for p in [*providers, "gemm_floor"]:
                peak = measure_peak(p, shape, dtype, device) - grads_mb if p != "gemm_floor" else float("nan")
                writer.add("multi_exit_linear_ce", p, label, "fwd_bwd_s", timings[p], peak_mb=peak)
                row[p], row[p + "_peak_mb"] = timings[p].p50, peak
                print(f"  {p:<15} {timings[p].p50:8.3f} s   extra peak beyond .grad {peak:8.1f} MB "
                      f"({peak / logits_mb:.3f}x logits)", flush=True)
            summary.append(row)
            del inputs, steps
    return summary


def report(summary) -> str:
    lines = ["ratios of the fused op (median fwd+bwd time; extra peak beyond the .grad buffers over the "
             "K x N x V logits in the input dtype); 'met' / 'MISSED' against issue 20's targets"]

    def verdict(value, target):
        return f"(target <= {target}: {'met' if value <= target else 'MISSED'})"

    for r in summary:
        f = r["fused"]
        low = r.get("dtype") in ("bfloat16", "float16")
        targets = {"torchtune": 0.75 if low else None, "torch.compile": 0.9 if low else 0.95}
        parts = [f"{r['shape']}: fused {f:.3f} s"]
        for base in ("torchtune", "torch.compile", "eager_per_exit", "logits_op", "liger"):
            if base in r:
                t = targets.get(base)
                parts.append(f"{f / r[base]:.2f}x {base}" + (" " + verdict(f / r[base], t) if t else ""))
        parts.append(f"{f / r['gemm_floor']:.2f}x GEMM floor ({r['gemm_floor']:.3f} s)")
        frac = r["fused_peak_mb"] / r["logits_mb"]
        parts.append(f"peak {frac:.3f}x logits {verdict(frac, 0.15)}; others: "
                     + ", ".join(f"{p} {r[p + '_peak_mb'] / r['logits_mb']:.2f}x" for p in PROVIDERS
                                 if p != "fused" and p + "_peak_mb" in r))
        lines.append("; ".join(parts))
    return "\n".join(lines)


def plot(summary, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    ax1, ax2 = fig.subplots(1, 2)
    names = [p for p in [*PROVIDERS, "gemm_floor"] if p in summary[0]]
    width = 0.8 / len(names)
    for i, p in enumerate(names):
        xs = [j + (i - len(names) / 2) * width for j in range(len(summary))]
        ax1.bar(xs, [r[p] for r in summary], width, label=p)
        if p != "gemm_floor":
            ax2.bar(xs, [r[p + "_peak_mb"] / r["logits_mb"] for r in summary], width, label=p)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(summary)), [r["shape"] for r in summary], rotation=10, fontsize=7)
    ax1.set_ylabel("fwd+bwd median (s)")
    ax2.set_ylabel("extra peak beyond .grad / logits")
    ax2.axhline(0.15, color="k", linestyle="--", linewidth=1)
    ax1.legend(fontsize=7)
    fig.suptitle(f"linear + multi-exit CE, torch {torch.__version__}, {torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="directory for the CSV and PNG")
    parser.add_argument("--shapes", nargs="+", default=["s1"], help="s1 s2 s3 or all (see SHAPES)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--providers", nargs="+", default=PROVIDERS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    if args.peak_child:
        shape = tuple(int(x) for x in args.child_shape.split(","))
        print(peak_child(args.peak_child, shape, dtypes[0], args.device))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.quick:
        shapes = QUICK_SHAPES
    else:
        keys = list(SHAPES) if args.shapes == ["all"] else args.shapes
        shapes = [SHAPES[s] for s in keys]
    providers = [p for p in args.providers if available(p, args.device)]
    common.RESULTS_DIR = args.out
    writer = common.CsvWriter("multi_exit_linear_ce")
    summary = run(shapes, dtypes, providers, args.device, writer, args.reps)
    print(report(summary))
    print("csv:", writer.write())
    png = os.path.join(args.out, "multi_exit_linear_ce.png")
    plot(summary, png)
    print("plot:", png)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
