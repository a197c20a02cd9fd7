"""Benchmark of budgeted early-exit inference (EarlyExitEngine.predict), batch 256.

Networks: a ResANN-sized conv ANN (``resann()``: 6 exits, 28x28 inputs) and the cheap MLP
ANN (``mlp_ann()``: six Linear(256, 256) + ReLU stages, linear heads), where per-stage
overhead shows. Exit distributions: MSDNet's geometric fractions p_k ~ r^k with r = 0.5
("early"), 1 ("uniform"), 2 ("late"), thresholds calibrated on the benchmark batch itself
so the realised distribution is the intended one, plus "none" (all +inf: full depth
through the engine).

Measured in one run, interleaved round by round so load changes hit every candidate alike:
- full-depth forward (all stages + the last head): the baseline;
- every stage and every head alone at the full batch -> time-ideal cost
  sum_k reach_k * (t_stage_k + t_head_k) (heads of +inf exits skipped, as the engine does),
  reach_k = fraction of samples that run stage k in the measured predict;
- ``engine.predict`` (fused exit op per stage) and a naive PyTorch loop (softmax, boolean
  masks, Python per stage);
- FLOP-ideal speedup: full FLOPs / mean exit FLOPs;
- decision + compaction: one ``early_exit_step`` call per stage at batch 256 on that
  stage's real hidden state and logits ("uniform" thresholds), against the naive loop's
  decision code on the same tensors.

The issue-12 metric for the MLP: ``engine_fraction_of_model_at_active_sizes`` = (the model's
own stages and heads at the batch sizes predict runs them) / predict; target >= 1/1.1 = 0.91
(predict within 1.1x of the model). The engine's cost model may run a stage on the whole
batch instead of compacting (masking) where the measured times say small batches are not
cheaper; the predict timings below include it, after its warm-up calls.

Usage: ``python bench/bench_early_exit.py [--device cpu|cuda] [--quick] [--out DIR] [--threads 1]
[--rounds-conv 15] [--rounds-mlp 200]``. Writes ``early_exit.csv`` (long format, appended) and
``early_exit.png`` to ``--out`` (default bench/results/).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ann_kernels import (
    EarlyExitEngine,
    calibrate_thresholds,
)
from ann_kernels.inference.calibration import geometric_exit_fractions
from ann_kernels.nn import mlp_ann, resann
from ann_kernels.ops.early_exit import exit_confidence, step_function
from bench.common import RESULTS_DIR, CsvWriter, peak_extra_mb, time_fn, time_interleaved

BATCH = 256
DISTRIBUTIONS = {"early": 0.5, "uniform": 1.0, "late": 2.0, "none": None}


def _rows(hidden, rows):
    return hidden[:rows] if isinstance(hidden, torch.Tensor) else type(hidden)(t[:rows] for t in hidden)


def full_depth(model, x):
    h = x
    for k in range(model.num_exits):
        h = model.forward_stage(k, h)
    return model.forward_head(model.num_exits - 1, h)


def naive_loop(model, x, thresholds):
    """Boolean masks and Python per stage (BranchyNet-style), max-prob criterion."""
    n = x.shape[0]
    prediction = torch.empty(n, dtype=torch.int64, device=x.device)
    exit_index = torch.empty(n, dtype=torch.int64, device=x.device)
    confidence = torch.empty(n, device=x.device)
    index, h = torch.arange(n, device=x.device), x
    for k in range(model.num_exits):
        h = model.forward_stage(k, h)
        logits = model.forward_head(k, h)
        conf, pred = logits.softmax(dim=-1).max(dim=-1)
        leave = conf >= thresholds[k] if k < model.num_exits - 1 else torch.ones_like(conf, dtype=torch.bool)
        out = index[leave]
        prediction[out], exit_index[out], confidence[out] = pred[leave], k, conf[leave]
        stay = ~leave
        index, h = index[stay], h[stay]
        if index.numel() == 0:
            break
    return prediction, exit_index, confidence


def naive_decision(logits, index, hidden, threshold, buffers):
    prediction, exit_index, confidence = buffers
    conf, pred = logits.softmax(dim=-1).max(dim=-1)
    leave = conf >= threshold
    out = index[leave]
    prediction[out], exit_index[out], confidence[out] = pred[leave], 0, conf[leave]
    stay = ~leave
    return index[stay], hidden[stay]


def _synced(fns, device):
    """CUDA: each candidate ends with a synchronize, so wall time covers its kernels."""
    if device.type != "cuda":
        return fns

    def wrap(fn):
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run

    return {name: wrap(fn) for name, fn in fns.items()}


def bench_network(name, model, x, rounds, csv, summary, stream_size, device=torch.device("cpu")):
    model.eval().to(device)
    x = x.to(device)
    engine = EarlyExitEngine(model)
    num_exits = model.num_exits
    with torch.inference_mode():
        logits = model(x)
        hidden_states, h = [], x
        for k in range(num_exits):
            hidden_states.append(h)  # the input of stage k
            h = model.forward_stage(k, h)
        stage_outputs = hidden_states[1:] + [h]
        confidence = torch.stack([exit_confidence(z)[0] for z in logits])
    costs = engine.exit_flops(x)
    thresholds = {}
    for dist, ratio in DISTRIBUTIONS.items():
        if ratio is None:
            thresholds[dist] = [math.inf] * num_exits
        else:
            fractions = geometric_exit_fractions(num_exits, ratio)
            thresholds[dist] = calibrate_thresholds(confidence, fractions).tolist()

    fns = {"full_depth": lambda: full_depth(model, x)}
    for k in range(num_exits):
        fns[f"stage{k}"] = lambda k=k: model.forward_stage(k, hidden_states[k])
        fns[f"head{k}"] = lambda k=k: model.forward_head(k, stage_outputs[k])
    reach_rows, stream_counts = {}, {}
    stream_batches = [x] + [torch.randn_like(x) for _ in range(stream_size - 1)]
    for dist, thr in thresholds.items():
        fns[f"predict:{dist}"] = lambda thr=thr: engine.predict(x, thresholds=thr)
        fns[f"stream:{dist}"] = lambda thr=thr: list(engine.stream(stream_batches, thresholds=thr))
        totals = [0] * num_exits
        for r in engine.stream(stream_batches, thresholds=thr):
            totals = [a + b for a, b in zip(totals, r.stats.samples_per_exit)]
        stream_counts[dist] = totals
        fns[f"naive:{dist}"] = lambda thr=thr: naive_loop(model, x, thr)
        # The model alone at the batch sizes the engine runs (stage k on reach_k rows): the
        # best any implementation that runs only the active samples can do.
        counts = engine.predict(x, thresholds=thr).stats.samples_per_exit
        reach_rows[dist] = [sum(counts[k:]) for k in range(num_exits)]
        for k, rows in enumerate(reach_rows[dist]):
            if 0 < rows < BATCH:
                fns[f"stage{k}@{rows}"] = lambda k=k, r=rows: model.forward_stage(
                    k, _rows(hidden_states[k], r)
                )
                fns[f"head{k}@{rows}"] = lambda k=k, r=rows: model.forward_head(k, _rows(stage_outputs[k], r))
    with torch.inference_mode():
        for thr in thresholds.values():  # the cost model's warm-up (stage times, exploration)
            for _ in range(8):
                engine.predict(x, thresholds=thr)
        timings = time_interleaved(_synced(fns, device), warmup=2, reps=rounds, rounds=rounds)  # one call each per round
    threads = torch.get_num_threads()
    t_full = timings["full_depth"].p50
    csv.add(
        "early_exit",
        "full_depth",
        f"{name} N={BATCH} threads={threads} dev={device.type}",
        "seconds",
        timings["full_depth"],
        peak_mb=peak_extra_mb(lambda: full_depth(model, x)),
    )

    for dist, thr in thresholds.items():
        shape = f"{name} N={BATCH} dist={dist} threads={threads} dev={device.type}"
        result = engine.predict(x, thresholds=thr)
        counts = result.stats.samples_per_exit
        reach = [sum(counts[k:]) / BATCH for k in range(num_exits)]
        head_runs = [
            reach[k] if (thr[k] != math.inf or k == num_exits - 1) else 0.0 for k in range(num_exits)
        ]
        ideal = sum(
            reach[k] * timings[f"stage{k}"].p50 + head_runs[k] * timings[f"head{k}"].p50
            for k in range(num_exits)
        )

        def sized(kind, k, rows):
            return timings[f"{kind}{k}" if rows == BATCH else f"{kind}{k}@{rows}"].p50 if rows else 0.0

        model_only = sum(
            sized("stage", k, r) + (sized("head", k, r) if head_runs[k] else 0.0)
            for k, r in enumerate(reach_rows[dist])
        )
        t_predict, t_naive = timings[f"predict:{dist}"].p50, timings[f"naive:{dist}"].p50
        row = {
            "net": name,
            "dist": dist,
            "counts": counts,
            "full_ms": 1e3 * t_full,
            "predict_ms": 1e3 * t_predict,
            "naive_ms": 1e3 * t_naive,
            "ideal_ms": 1e3 * ideal,
            "speedup": t_full / t_predict,
            "ideal_speedup": t_full / ideal,
            "flop_speedup": float(costs[-1]) / result.stats.mean_flops,
            "naive_speedup": t_full / t_naive,
            "of_ideal": ideal / t_predict,
            "naive_of_ideal": ideal / t_naive,
            "model_only_ms": 1e3 * model_only,
            "model_only_speedup": t_full / model_only,
            "of_model_only": model_only / t_predict,
            "model_only_of_ideal": ideal / model_only,
        }
        stream_reach = [sum(stream_counts[dist][k:]) / (BATCH * stream_size) for k in range(num_exits)]
        stream_ideal = sum(
            stream_reach[k] * timings[f"stage{k}"].p50
            + (stream_reach[k] if head_runs[k] else 0.0) * timings[f"head{k}"].p50
            for k in range(num_exits)
        )
        t_stream = timings[f"stream:{dist}"].p50 / stream_size
        row.update(
            stream_ms=1e3 * t_stream,
            stream_of_ideal=stream_ideal / t_stream,
            stream_speedup=t_full / t_stream,
        )
        summary.append(row)
        csv.add(
            "early_exit",
            "engine_stream",
            shape + f" batches={stream_size}",
            "seconds_per_batch",
            timings[f"stream:{dist}"].scaled(1.0 / stream_size),
        )
        csv.add(
            "early_exit",
            "engine_stream",
            shape + f" batches={stream_size}",
            "engine_fraction_of_time_ideal",
            value=row["stream_of_ideal"],
        )
        with torch.inference_mode():
            peak = peak_extra_mb(lambda thr=thr: engine.predict(x, thresholds=thr))
        csv.add("early_exit", "engine", shape, "seconds", timings[f"predict:{dist}"], peak_mb=peak)
        csv.add("early_exit", "naive_loop", shape, "seconds", timings[f"naive:{dist}"])
        csv.add("early_exit", "time_ideal", shape, "seconds", value=ideal)
        csv.add("early_exit", "model_at_active_sizes", shape, "seconds", value=model_only)
        for metric, value in (
            ("speedup_vs_full", row["speedup"]),
            ("time_ideal_speedup", row["ideal_speedup"]),
            ("flop_ideal_speedup", row["flop_speedup"]),
            ("naive_speedup_vs_full", row["naive_speedup"]),
            ("engine_fraction_of_time_ideal", row["of_ideal"]),
            ("engine_fraction_of_model_at_active_sizes", row["of_model_only"]),
            ("model_at_active_sizes_fraction_of_time_ideal", row["model_only_of_ideal"]),
            ("naive_fraction_of_time_ideal", row["naive_of_ideal"]),
        ):
            csv.add(
                "early_exit", "engine" if "naive" not in metric else "naive_loop", shape, metric, value=value
            )

    # Decision + compaction per stage at the full batch ("uniform" thresholds).
    uniform = thresholds["uniform"]
    per_stage = []
    with torch.inference_mode():
        for k in range(num_exits - 1):
            z, hid = logits[k], stage_outputs[k]
            index = torch.arange(BATCH, device=device)
            buffers = (
                torch.empty(BATCH, dtype=torch.int64, device=device),
                torch.empty(BATCH, dtype=torch.int64, device=device),
                torch.empty(BATCH, device=device),
            )
            args = (z, index, hid, *buffers, uniform[k], 0, k, -1)
            step = step_function(device.type)
            fused = time_fn(
                lambda args=args: step(*args),
                warmup=50,
                reps=2000 if name == "mlp" else 300,
            )
            naive = time_fn(
                lambda args=(z, index, hid, uniform[k], buffers): naive_decision(*args),
                warmup=50,
                reps=2000 if name == "mlp" else 300,
            )
            shape = f"{name} N={BATCH} stage={k} hidden={tuple(hid.shape[1:])} threads={threads} dev={device.type}"
            csv.add("early_exit_step", "cpp", shape, "seconds", fused)
            csv.add("early_exit_step", "naive_masks", shape, "seconds", naive)
            per_stage.append((k, 1e6 * fused.p50, 1e6 * naive.p50, tuple(hid.shape[1:])))
    return per_stage


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({r["net"] for r in summary}, key=lambda n: [r["net"] for r in summary].index(n))
    fig, axes = plt.subplots(1, len(nets), figsize=(7 * len(nets), 4.5), squeeze=False)
    bars = [
        ("speedup", "engine predict"),
        ("ideal_speedup", "time-ideal"),
        ("flop_speedup", "FLOP-ideal"),
        ("model_only_speedup", "model alone at active sizes"),
        ("stream_speedup", "engine stream (per batch)"),
        ("naive_speedup", "naive mask loop"),
    ]
    for ax, net in zip(axes[0], nets):
        rows = [r for r in summary if r["net"] == net]
        width = 0.8 / len(bars)
        for j, (key, label) in enumerate(bars):
            ax.bar([i + j * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels([f"{r['dist']}\n{r['of_ideal']:.2f}x ideal" for r in rows])
        ax.set_ylabel("speedup over full-depth forward")
        ax.set_title(f"{net}, batch {BATCH}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: steadiest on a shared 2-core machine)",
    )
    parser.add_argument("--rounds-conv", type=int, default=15)
    parser.add_argument("--rounds-mlp", type=int, default=200)
    parser.add_argument("--stream-batches-conv", type=int, default=4, help="batches per stream() call")
    parser.add_argument("--stream-batches-mlp", type=int, default=16, help="batches per stream() call")
    parser.add_argument("--nets", nargs="+", default=["resann", "mlp"], choices=["resann", "mlp"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="few rounds and stream batches (well under a minute)")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for early_exit.csv and early_exit.png")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.quick:
        args.rounds_conv, args.rounds_mlp = min(args.rounds_conv, 7), min(args.rounds_mlp, 49)
        args.stream_batches_conv, args.stream_batches_mlp = 2, 4
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    csv, summary, decisions = CsvWriter("early_exit"), [], {}
    csv.path = os.path.join(args.out, "early_exit.csv")
    for net in args.nets:
        if net == "resann":
            model, x, rounds = resann(), torch.randn(BATCH, 1, 28, 28), args.rounds_conv
        else:
            model, x, rounds = mlp_ann(), torch.randn(BATCH, 256), args.rounds_mlp
        decisions[net] = bench_network(
            net,
            model,
            x,
            rounds,
            csv,
            summary,
            args.stream_batches_conv if net == "resann" else args.stream_batches_mlp,
            device,
        )
    path = csv.write()
    png = os.path.join(args.out, "early_exit.png")
    plot(summary, png)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH}, commit {csv.commit}"
    )
    print(
        "times in ms (p50); speedups over the full-depth forward; 'of ideal' = time-ideal / measured;\n"
        "'model@sizes' = the stages and heads alone at the batch sizes the engine runs them at;\n"
        "'stream/batch' = engine.stream() over several batches (queue per stage), time per batch"
    )
    print(
        f"{'net':>6} {'dist':>8} {'exits per stage':>28} {'full':>7} {'predict':>7} {'ideal':>7} "
        f"{'model@sizes':>11} {'naive':>7} {'speedup':>7} {'ideal x':>7} {'FLOP x':>6} {'naive x':>7} "
        f"{'of ideal':>8} {'naive':>6} {'model@sizes':>11} {'stream/batch':>12} {'of ideal':>8} "
        f"{'predict/model@sizes':>19}"
    )
    for r in summary:
        print(
            f"{r['net']:>6} {r['dist']:>8} {list(r['counts'])!s:>28} {r['full_ms']:>7.2f} {r['predict_ms']:>7.2f} "
            f"{r['ideal_ms']:>7.2f} {r['model_only_ms']:>11.2f} {r['naive_ms']:>7.2f} {r['speedup']:>7.2f} "
            f"{r['ideal_speedup']:>7.2f} {r['flop_speedup']:>6.2f} {r['naive_speedup']:>7.2f} {r['of_ideal']:>8.2f} "
            f"{r['naive_of_ideal']:>6.2f} {r['model_only_of_ideal']:>11.2f} {r['stream_ms']:>12.2f} "
            f"{r['stream_of_ideal']:>8.2f} {1 / r['of_model_only']:>19.2f}"
        )
    print("predict/model@sizes: predict time over the model's own stages + heads at the sizes predict "
          "runs them (target <= 1.1 on the MLP)")
    print("\ndecision + compaction per stage at batch 256 (p50 us): fused op vs naive masks")
    for net, rows in decisions.items():
        for k, fused, naive, shape in rows:
            print(f"{net:>6} stage {k} hidden {shape!s:>14}: {fused:7.1f} us   naive {naive:7.1f} us")
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
