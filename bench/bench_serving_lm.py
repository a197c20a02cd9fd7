"""Benchmark of the LM server under open-loop load: ``GenerationServer`` (iteration-level
batching) in ``full`` mode (plain continuous batching) against ``self_speculative`` and
``confidence`` early exit, on the same prompts and arrival times.

Model: the benchmark LM ``runs/bench_lm/last.pt`` (``scripts/train_bench_lm.py``),
``--checkpoint`` to override; without it a random model of the same size (speeds stay
meaningful, acceptance and exits do not: the script says so). Prompts: blocks of the held-out
test split cut to mixed lengths (``--prompt-lens``, uniform); each request asks for a uniform
number of new tokens in ``--new-tokens`` (no EOS stop: the lengths are the asked ones), greedy.

1. Capacity: ``full`` saturated (4x ``--max-batch-size`` requests submitted at once, so the
   batch stays full for most of the run; the better of two runs), in requests/s.
2. For each offered load (``--loads``: fractions of that capacity, 10% to 150%), interleaved
   over the providers: Poisson arrivals for ``--duration`` seconds (the same arrival times and
   requests for every provider), in-process ``submit`` (no HTTP: the server's own latencies);
   per provider: generated tokens/s (tokens over first arrival to last finish), TTFT and
   inter-token latency p50/p99, whether it kept up (the last request finished within 1.25x the
   arrival window + 1 s: a server slower than the offered load builds a backlog).
3. The highest load held: the largest offered load such that it and every lower one had a p99
   inter-token latency under the SLO (``--itl-slo-ms``; default 2x ``full``'s p99 at the
   lowest load: a p99 gap includes the prefill of a request that joined, which a p50-based SLO
   rules out at every load) and kept up; also for SLOs of 1.5x, 2x, 3x and 5x that p99 (one
   table, the same runs). Quality next to it: each early-exit provider's greedy completions (every load)
   against ``full``'s on the same requests: exact-match rate and the full model's NLL of the
   generated tokens (teacher-forced, ``bench_generate.full_model_nll``), as a rise over
   ``full``'s own output (the generation issue's quality measure).
4. Light load (one client, sequential requests, interleaved request by request): TTFT and
   inter-token latency (each request's mean gap; the median over requests) of the server (its
   ``max_wait_s`` of 2 ms, which an idle server waits only for a burst, and a second server
   with ``max_wait_s=0``) against ``ann_kernels.generate`` at batch 1 on the same prompts (its
   TTFT: a ``max_new_tokens=1`` call; its gap: the call's decode seconds per step).
   ``--light-only`` runs this step alone.
5. Chunked prefill (``--join-spike-only`` runs this step alone): 8 rows decode long
   completions while 6 long prompts (the model's context minus 4) join one after another (a
   fixed 15 ms apart); the running rows' inter-token gaps (p50, p99, max) and the joining
   prompts' TTFT, with whole prefill (``prefill_chunk_tokens=None``) and with chunks of
   ``--prefill-chunk-tokens`` (default 16 here), interleaved, 3 runs each; a whole prefill of
   a long prompt stalls every running row for its length, chunks cut that stall into pieces.

``confidence`` thresholds are calibrated on the validation split for each of ``--budgets`` (a mean
cost per token as a fraction of the full model's; ``calibrate_generation``).
Usage: ``python bench/bench_serving_lm.py [--quick] [--light-only] [--join-spike-only] [--prefill-chunk-tokens C]
[--device cpu|cuda] [--checkpoint P] [--threads N] [--out DIR]``.
Writes ``serving_lm.csv`` (long format, appended) and ``serving_lm.png`` (p99 inter-token
latency and tokens/s against offered load). Numbers from a shared machine: the load average is
printed and stored in the CSV's notes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ann_kernels  # noqa: E402
from ann_kernels.generation import GenerationServer  # noqa: E402
from ann_kernels.generation.calibration import calibrate_generation  # noqa: E402
from ann_kernels.generation.checkpoint import held_out_blocks, load_lm_checkpoint  # noqa: E402
from bench.bench_generate import full_model_nll  # noqa: E402
from bench.common import RESULTS_DIR, CsvWriter  # noqa: E402

DEFAULT_CHECKPOINT = "runs/bench_lm/last.pt"


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def load_model(path):
    if os.path.isfile(path):
        lm = load_lm_checkpoint(path)
        print(f"model: {path} (epoch {lm.epoch}, exits after layers {lm.model.exit_layers})")
        return lm.model, lm.run_dir
    from ann_kernels.nn.causal_lm import causal_exit_lm

    print(f"model: {path} not found (train it with scripts/train_bench_lm.py); using a RANDOM model of the "
          "benchmark size: speeds are meaningful, acceptance rates and exits are not")
    torch.manual_seed(0)
    return causal_exit_lm(2048, dim=128, layers=6, heads=4, max_len=128).eval(), None


def make_requests(model, run_dir, n, prompt_lens, new_tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    if run_dir is not None:
        blocks = held_out_blocks(run_dir, "test", prompt_lens[1], n)
    else:
        blocks = torch.randint(0, 2048, (n, prompt_lens[1]), generator=gen)
    out = []
    for i in range(n):
        length = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (1,), generator=gen))
        new = int(torch.randint(new_tokens[0], new_tokens[1] + 1, (1,), generator=gen))
        out.append((blocks[i % blocks.shape[0], :length].tolist(), new))
    return out


def run_load(server, requests, arrivals, params):
    """Submit ``requests`` at ``arrivals`` (seconds from now); the completions and the window."""
    futures = []
    start = time.perf_counter()
    for (prompt, new), at in zip(requests, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(server.submit(prompt, max_new_tokens=new, **params))
    done = [f.result(600) for f in futures]
    return done, time.perf_counter() - start


def summarise(done, elapsed):
    tokens = sum(len(c.token_ids) for c in done)
    itl = [g for c in done for g in c.inter_token_s]
    ttft = [c.ttft_s for c in done if c.ttft_s is not None]
    return {"tokens_per_s": tokens / elapsed, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99), "elapsed": elapsed, "tokens": tokens}


def held(rows, slo):
    """The highest load of ``rows`` (increasing loads) such that it and every lower one kept up
    with p99 inter-token latency <= ``slo``; 0 if the lowest did not."""
    best = 0.0
    for r in rows:
        if not (r["itl_p99"] <= slo and r["kept_up"]):
            break
        best = r["load"]
    return best


def ratio_text(value, base):
    if base > 0:
        return f"{value / base:.2f}x"
    return "n/a (full held no load)" if value == 0 else "above full (full held no load)"


def quality_against_full(model, outputs):
    """provider -> (exact-match rate of its generated tokens with full's, full-model NLL rise)."""
    ref = outputs["full"]
    full_nll = full_model_nll(model, [p for p, _ in ref], [g for _, g in ref])
    out = {}
    for name, rows in outputs.items():
        if name == "full":
            continue
        exact = sum(g == r for (_, g), (_, r) in zip(rows, ref)) / max(len(rows), 1)
        nll = full_model_nll(model, [p for p, _ in rows], [g for _, g in rows])
        out[name] = (exact, nll / full_nll - 1 if full_nll > 0 else float("nan"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of arrivals per load and provider")
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=[8, 48])
    ap.add_argument("--new-tokens", type=int, nargs=2, default=[16, 48])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--spec-exit", type=int, default=None, help="self_speculative draft exit (default: (K-1)//2)")
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8],
                    help="confidence: mean cost per token (fraction of full), one provider each")
    ap.add_argument("--itl-slo-ms", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefill-chunk-tokens", type=int, default=None,
                    help="the server's chunked prefill (GenerationServer prefill_chunk_tokens; default off)")
    ap.add_argument("--quick", action="store_true", help="loads 0.25 0.5 1.0 1.5, 2 s each")
    ap.add_argument("--light-only", action="store_true", help="only step 4 (one client against generate)")
    ap.add_argument("--join-spike-only", action="store_true", help="only step 5 (chunked prefill vs whole)")
    ap.add_argument("--out", default=RESULTS_DIR)
    args = ap.parse_args()
    if args.quick:
        args.loads, args.duration = [0.25, 0.5, 1.0, 1.5], 2.0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, run_dir = load_model(args.checkpoint)
    model = model.to(args.device)
    k_exits = len(model.exit_layers)
    spec_exit = (k_exits - 1) // 2 if args.spec_exit is None else args.spec_exit
    providers = {"full": {"mode": "full"},
                 f"self_speculative_{spec_exit}": {"mode": "self_speculative", "exit_index": spec_exit,
                                                   "draft_len": args.draft_len}}
    if run_dir is not None:
        val_blocks = held_out_blocks(run_dir, "val", 64, 32)
        for budget in args.budgets:
            calib = calibrate_generation(model, val_blocks.to(args.device), budget)
            providers[f"confidence_b{budget:g}"] = {"mode": "confidence", "threshold": calib}
            print(f"confidence thresholds for budget {budget}: {[round(float(t), 3) for t in calib.thresholds]} "
                  f"(held-out agreement with full {calib.accuracy:.3f})")
    else:
        providers["confidence_t0.5"] = {"mode": "confidence", "threshold": 0.5}
    load_avg = os.getloadavg()[0]
    print(f"load average {load_avg:.1f}; threads {torch.get_num_threads()}")
    csv = CsvWriter("serving_lm", args.out)
    shape = f"prompt{args.prompt_lens[0]}-{args.prompt_lens[1]}_new{args.new_tokens[0]}-{args.new_tokens[1]}"
    notes = f"load {load_avg:.1f}; in-process submit; {args.device}; prefill chunk {args.prefill_chunk_tokens}"
    server = GenerationServer(model, max_batch_size=args.max_batch_size, max_wait_s=0.002, max_queue=1 << 16,
                              prefill_chunk_tokens=args.prefill_chunk_tokens)
    if args.join_spike_only:
        server.close()
        join_spike(model, run_dir, args, csv, notes)
        print(f"wrote {csv.write()}")
        return 0
    if args.light_only:
        try:
            light_load(model, run_dir, args, server, csv, shape, notes)
        finally:
            server.close()
        print(f"wrote {csv.write()}")
        return 0
    try:
        # 1. capacity of full (saturated)
        warm = make_requests(model, run_dir, 8, args.prompt_lens, args.new_tokens, seed=99)
        run_load(server, warm, [0.0] * len(warm), providers["full"])
        sat = make_requests(model, run_dir, 4 * args.max_batch_size, args.prompt_lens, args.new_tokens, seed=1)
        runs = [run_load(server, sat, [0.0] * len(sat), providers["full"]) for _ in range(2)]
        done, elapsed = min(runs, key=lambda r: r[1])  # the better of two (other processes share the CPU)
        capacity = len(sat) / elapsed
        print(f"full capacity: {capacity:.2f} requests/s ({summarise(done, elapsed)['tokens_per_s']:.0f} tokens/s)")
        csv.add("serving_lm", "full", shape, "capacity_requests_per_s", value=capacity, notes=notes)
        # 2. open-loop loads, interleaved providers
        results = {name: [] for name in providers}
        outputs = {name: [] for name in providers}  # (prompt, generated tokens) of every load
        for li, load in enumerate(args.loads):
            rate = load * capacity
            n = max(4, int(rate * args.duration))
            gen = torch.Generator().manual_seed(1000 + li)
            gaps = torch.empty(n).exponential_(1.0, generator=gen) / rate
            arrivals = torch.cumsum(gaps, 0).tolist()
            requests = make_requests(model, run_dir, n, args.prompt_lens, args.new_tokens, seed=2000 + li)
            for name, params in providers.items():
                done, elapsed = run_load(server, requests, arrivals, params)
                s = summarise(done, elapsed)
                s.update(load=load, kept_up=elapsed <= 1.25 * arrivals[-1] + 1.0)
                results[name].append(s)
                outputs[name].extend((p, c.token_ids) for (p, _), c in zip(requests, done))
                print(f"load {load:4.2f} ({rate:6.2f} req/s, {n} requests) {name:24s} {s['tokens_per_s']:8.1f} tok/s  "
                      f"TTFT p50 {1e3 * s['ttft_p50']:7.1f} p99 {1e3 * s['ttft_p99']:7.1f} ms  ITL p50 "
                      f"{1e3 * s['itl_p50']:6.1f} p99 {1e3 * s['itl_p99']:6.1f} ms  kept up {s['kept_up']}", flush=True)
                for metric in ("tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
                    csv.add("serving_lm", name, f"{shape}_load{load:g}", metric, value=s[metric], notes=notes)
        # 3. highest load held under the ITL SLO; quality of each early-exit provider against full
        base_p99 = results["full"][0]["itl_p99"]
        slo = args.itl_slo_ms / 1e3 if args.itl_slo_ms else 2 * base_p99
        held_load = {name: held(rows, slo) for name, rows in results.items()}
        for name in providers:
            csv.add("serving_lm", name, shape, "max_load_under_itl_slo", value=held_load[name],
                    notes=f"{notes}; SLO p99 ITL {1e3 * slo:.1f} ms")
        quality = quality_against_full(model, outputs)
        print(f"ITL SLO (p99) {1e3 * slo:.1f} ms; highest offered load held (fraction of full capacity): "
              + ", ".join(f"{k} {v:g}" for k, v in held_load.items()))
        for name, (exact, rise) in quality.items():
            print(f"  {name}: {ratio_text(held_load[name], held_load['full'])} full's (target >= 1.3x for the better "
                  f"early-exit mode); quality vs full: exact match {exact:.3f}, full-model NLL rise {100 * rise:+.1f}%")
            csv.add("serving_lm", name, shape, "exact_match_vs_full", value=exact, notes=notes)
            csv.add("serving_lm", name, shape, "nll_rise", value=rise, notes=notes)
        print("held load at other SLOs (multiples of full's p99 ITL at the lowest load, "
              f"{1e3 * base_p99:.2f} ms): " + "; ".join(
                  f"{m}x: " + ", ".join(f"{k} {held(rows, m * base_p99):g}" for k, rows in results.items())
                  for m in (1.5, 2, 3, 5)))
        light_load(model, run_dir, args, server, csv, shape, notes)
    finally:
        server.close()
    join_spike(model, run_dir, args, csv, notes)
    path = csv.write()
    png = plot(results, slo, os.path.join(args.out, "serving_lm.png"), load_avg)
    print(f"wrote {path} and {png}")
    return 0


def light_load(model, run_dir, args, server, csv, shape, notes):
    """4. One client against ``generate`` at batch 1, interleaved request by request: the
    server as configured (an idle server waits ``max_wait_s`` only for a burst) and one with
    ``max_wait_s=0``. TTFT: the server's, against a ``generate(max_new_tokens=1)`` call;
    inter-token latency: each request's mean gap in the server, against its ``generate``
    call's decode seconds per step (``stats``); medians over requests."""
    light = make_requests(model, run_dir, 8, args.prompt_lens, args.new_tokens, seed=7)
    no_wait = GenerationServer(model, max_batch_size=args.max_batch_size, max_wait_s=0.0)
    ttft = {"server": [], "server_no_wait": [], "generate": []}
    itl = {"server": [], "server_no_wait": [], "generate": []}
    try:
        for _ in range(2):
            for prompt, new in light:
                for name, srv in (("server", server), ("server_no_wait", no_wait)):
                    c = srv.submit(prompt, max_new_tokens=new).result(600)
                    ttft[name].append(c.ttft_s)
                    itl[name].append(statistics.fmean(c.inter_token_s))
                t0 = time.perf_counter()
                ann_kernels.generate(model, [prompt], max_new_tokens=1)
                ttft["generate"].append(time.perf_counter() - t0)
                out = ann_kernels.generate(model, [prompt], max_new_tokens=new)
                itl["generate"].append(out.stats["decode_s"] / out.stats["steps"])
    finally:
        no_wait.close()
    for metric, values in (("ttft", ttft), ("itl", itl)):
        ref = statistics.median(values["generate"])
        csv.add("serving_lm", "generate_batch1", shape, f"{metric}_p50", value=ref, notes=notes)
        for name, label in (("server", f"server_one_client_wait{1e3 * server.max_wait_s:g}ms"),
                            ("server_no_wait", "server_one_client_wait0ms")):
            srv = statistics.median(values[name])
            print(f"light load {metric}: {label} {1e3 * srv:.2f} ms, generate batch 1 {1e3 * ref:.2f} ms "
                  f"({srv / ref:.2f}x; target <= 1.2x)")
            csv.add("serving_lm", label, shape, f"{metric}_p50", value=srv, notes=notes)


def join_spike(model, run_dir, args, csv, notes, runs=3):
    """5. Long prompts joining a running batch, prefilled whole or in chunks (module docstring)."""
    chunk = args.prefill_chunk_tokens or 16
    max_len = int(model.max_len)
    running = make_requests(model, run_dir, 8, (8, 8), (max_len - 16, max_len - 16), seed=11)
    joining = make_requests(model, run_dir, 6, (max_len - 4, max_len - 4), (4, 4), seed=12)
    gaps = {None: [], chunk: []}
    ttft = {None: [], chunk: []}
    tokens = {None: [], chunk: []}  # every completion's tokens (greedy: whole and chunked should agree)
    for _ in range(runs):
        for c in (None, chunk):
            with GenerationServer(model, max_batch_size=16, max_wait_s=0.0, prefill_chunk_tokens=c) as srv:
                streams = [srv.stream(p, max_new_tokens=n) for p, n in running]
                for s in streams:
                    next(s)  # every running row is decoding
                futures = []
                for p, n in joining:
                    futures.append(srv.submit(p, max_new_tokens=n))
                    time.sleep(0.015)
                done = [f.result(600) for f in futures] + [s.future.result(600) for s in streams]
                ttft[c] += [d.ttft_s for d in done[:len(futures)]]
                gaps[c] += [g for d in done[len(futures):] for g in d.inter_token_s]
                tokens[c] += [d.token_ids for d in done]
    shape = f"running8_joining6x{max_len - 4}"
    label = {None: "whole_prefill", chunk: f"chunked_prefill_{chunk}"}
    for c in (None, chunk):
        row = {"itl_p50": pct(gaps[c], 0.5), "itl_p99": pct(gaps[c], 0.99), "itl_max": max(gaps[c]),
               "joining_ttft_p50": pct(ttft[c], 0.5)}
        print(f"join spike {label[c]:20s} running rows' ITL p50 {1e3 * row['itl_p50']:6.2f} p99 "
              f"{1e3 * row['itl_p99']:6.2f} max {1e3 * row['itl_max']:6.2f} ms; joining prompts' TTFT p50 "
              f"{1e3 * row['joining_ttft_p50']:6.1f} ms")
        for metric, value in row.items():
            csv.add("serving_lm", label[c], shape, metric, value=value, notes=notes)
    same = sum(a == b for a, b in zip(tokens[None], tokens[chunk])) / len(tokens[None])
    print(f"join spike: chunked / whole p99 ITL {pct(gaps[chunk], 0.99) / pct(gaps[None], 0.99):.2f}x, max ITL "
          f"{max(gaps[chunk]) / max(gaps[None]):.2f}x; greedy completions equal whole vs chunked: {same:.3f}")
    csv.add("serving_lm", label[chunk], shape, "exact_match_vs_whole", value=same, notes=notes)


def plot(results, slo, path, load_avg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        loads = [r["load"] for r in rows]
        ax1.plot(loads, [1e3 * r["itl_p99"] for r in rows], marker="o", label=name)
        ax2.plot(loads, [r["tokens_per_s"] for r in rows], marker="o", label=name)
    ax1.axhline(1e3 * slo, color="grey", linestyle="--", label="ITL SLO")
    ax1.set_xlabel("offered load (fraction of full's capacity)")
    ax1.set_ylabel("p99 inter-token latency (ms)")
    ax1.set_yscale("log")
    ax2.set_xlabel("offered load (fraction of full's capacity)")
    ax2.set_ylabel("generated tokens/s")
    ax1.legend()
    fig.suptitle(f"GenerationServer under Poisson load (load average {load_avg:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
