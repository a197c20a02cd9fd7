"""Load benchmark of the HTTP server with a real load generator (``wrk``, Debian), loopback only.

What ``ann-kernels serve`` runs, in this process: an ``EarlyExitServer`` behind the FastAPI
app (:func:`ann_kernels.serve.start_http`: uvicorn on its own thread), driven by ``wrk``
(closed loop: ``--connections`` connections each send their next request when the previous
answer arrives, so the server runs saturated) through a Lua script that cycles through
``--bodies`` different requests of 1-8 rows (so the exit mix is the pool's, not one body's).

Networks as in ``bench_serving.py``: ``mlp`` (six Linear(256, 256) stages) and ``resann``
(6 exits, 1x28x28 inputs); thresholds put MSDNet's uniform geometric exit distribution on a
calibration batch. Providers, interleaved per round (the best round of ``--rounds`` is kept:
machine load only ever slows a round):

- ``early_exit``: the server with the thresholds;
- ``full_depth``: the same server with every threshold +inf (dynamic batching at full depth).

Protocols: ``predict`` (our JSON ``POST /predict``) and ``oip`` (``POST /v2/models/{m}/infer``
with binary tensors in and out, what tritonclient sends). Per (net, protocol, provider):
requests/s, rows/s, p50 / p99 latency (wrk's own histogram), non-2xx answers (must be 0), and
the early-exit gain in rows/s. The load generator shares the machine's cores with the server:
the numbers are the server's throughput with a client beside it, not alone.

Usage: ``python bench/bench_serving_http.py [--quick] [--out DIR] [--nets mlp resann]
[--protocols predict oip] [--connections 32] [--seconds 3] [--rounds 2]``. Writes
``serving_http.csv`` (long format, appended) and ``serving_http.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ann_kernels import EarlyExitEngine, EarlyExitServer, calibrate_thresholds  # noqa: E402
from ann_kernels.inference.calibration import geometric_exit_fractions  # noqa: E402
from ann_kernels.nn import mlp_ann, resann  # noqa: E402
from ann_kernels.ops.early_exit import exit_confidence  # noqa: E402
from ann_kernels.serve import start_http  # noqa: E402
from bench.common import RESULTS_DIR, CsvWriter  # noqa: E402

MAX_BATCH = 256
MODEL = "bench"
# wrk script: cycle through the request files; print one parsable line at the end
LUA = r"""
local requests, n, i = {}, 0, 0
init = function(args)
  for _, path in ipairs(args) do
    local f = assert(io.open(path, "rb")); local body = f:read("*a"); f:close()
    local f2 = assert(io.open(path .. ".headers", "rb")); local header_length = f2:read("*a"); f2:close()
    local headers = {["Content-Type"] = "application/json"}
    if header_length ~= "" then
      headers["Content-Type"] = "application/octet-stream"
      headers["Inference-Header-Content-Length"] = header_length
    end
    n = n + 1
    requests[n] = wrk.format("POST", nil, headers, body)
  end
end
request = function()
  i = i % n + 1
  return requests[i]
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def write_bodies(directory: str, pool: torch.Tensor, count: int, protocol: str, seed: int) -> tuple[list, int]:
    """``count`` request files of 1-8 rows; returns (paths, total rows)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (count,), generator=gen).tolist()
    starts = torch.randint(0, pool.shape[0] - 8, (count,), generator=gen).tolist()
    paths, rows = [], 0
    for j, (s, n) in enumerate(zip(starts, sizes)):
        x = pool[s:s + n].contiguous()
        rows += n
        if protocol == "predict":
            body, header_length = json.dumps({"inputs": x.tolist()}).encode(), ""
        else:
            header = json.dumps({"parameters": {"binary_data_output": True}, "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": 4 * x.numel()}}]}).encode()
            body, header_length = header + x.numpy().tobytes(), str(len(header))
        path = os.path.join(directory, f"{protocol}_{j}.body")
        with open(path, "wb") as handle:
            handle.write(body)
        with open(path + ".headers", "w") as handle:
            handle.write(header_length)
        paths.append(path)
    return paths, rows


def run_wrk(url: str, script: str, bodies: list, connections: int, seconds: float) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", script,
               url, "--", *bodies]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    match = re.search(r"RESULT (.*)", out)
    if not match:
        raise RuntimeError(f"wrk: no RESULT line in its output:\n{out}")
    fields = dict(item.split("=") for item in match.group(1).split())
    result = {k: int(v) for k, v in fields.items()}
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def thresholds_for(model, pool) -> list[float]:
    with torch.inference_mode():
        confidence = torch.stack([exit_confidence(z)[0] for z in model(pool[:MAX_BATCH])])
    thresholds = calibrate_thresholds(confidence, geometric_exit_fractions(model.num_exits, 1.0)).tolist()
    thresholds[-1] = -math.inf
    return thresholds


def bench_network(name, model, pool, args, csv, summary, workdir):
    model = model.eval()
    engine = EarlyExitEngine(model)
    num_exits = model.num_exits
    plans = {"early_exit": thresholds_for(model, pool), "full_depth": [math.inf] * (num_exits - 1) + [-math.inf]}
    sample_shape = tuple(pool.shape[1:])
    servers = {n: EarlyExitServer(engine, thresholds=t, max_batch_size=MAX_BATCH, max_wait_s=args.max_wait_ms / 1e3,
                                  sample_shape=sample_shape).start() for n, t in plans.items()}
    fronts = {n: start_http(s, model_name=MODEL) for n, s in servers.items()}
    script = os.path.join(workdir, "cycle.lua")
    with open(script, "w") as handle:
        handle.write(LUA)
    try:
        for protocol in args.protocols:
            bodies, rows = write_bodies(workdir, pool, args.bodies, protocol, seed=1)
            rows_per_request = rows / len(bodies)
            path = "/predict" if protocol == "predict" else f"/v2/models/{MODEL}/infer"
            for n in plans:  # warm-up: first calls, FLOP counting, stage timings
                run_wrk(fronts[n].url + path, script, bodies, args.connections, 1)
            best = {n: None for n in plans}
            for _ in range(args.rounds):  # interleaved
                for n in plans:
                    r = run_wrk(fronts[n].url + path, script, bodies, args.connections, args.seconds)
                    if r["non2xx"] or r["errors"]:
                        raise RuntimeError(f"{name} {protocol} {n}: {r['non2xx']} non-2xx answers, "
                                           f"{r['errors']} socket errors")
                    if best[n] is None or r["rps"] > best[n]["rps"]:
                        best[n] = r
            shape = (f"{name} {protocol} c={args.connections} B={MAX_BATCH} wait={args.max_wait_ms}ms "
                     f"threads={torch.get_num_threads()} rows/request={rows_per_request:.2f}")
            for n, r in best.items():
                csv.add("serving_http", n, shape, "requests_per_s", value=r["rps"])
                csv.add("serving_http", n, shape, "rows_per_s", value=r["rps"] * rows_per_request)
                csv.add("serving_http", n, shape, "latency_p50_s", value=r["p50_us"] / 1e6)
                csv.add("serving_http", n, shape, "latency_p99_s", value=r["p99_us"] / 1e6)
            gain = best["early_exit"]["rps"] / best["full_depth"]["rps"]
            csv.add("serving_http", "early_exit", shape, "gain_vs_full_depth", value=gain)
            exits = servers["early_exit"].stats().rows_per_exit
            summary.append(dict(net=name, protocol=protocol, best=best, gain=gain, rows_per_request=rows_per_request,
                                exits=exits))
            for n, r in best.items():
                print(f"  {name:>6} {protocol:>7} {n:>10}: {r['rps']:8.0f} requests/s "
                      f"({r['rps'] * rows_per_request:8.0f} rows/s), p50 {r['p50_us'] / 1e3:7.2f} ms, "
                      f"p99 {r['p99_us'] / 1e3:7.2f} ms", flush=True)
            print(f"  {name:>6} {protocol:>7} early-exit gain {gain:.2f}x; exits so far {list(exits)}", flush=True)
    finally:
        for f in fronts.values():
            f.close()
        for s in servers.values():
            s.close()


def gain_text(s: dict, provider: str) -> str:
    return f"{s['gain']:.2f}x" if provider == "early_exit" else ""


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{s['net']}\n{s['protocol']}" for s in summary]
    xs = range(len(summary))
    for offset, n in ((-0.2, "early_exit"), (0.2, "full_depth")):
        axes[0].bar([x + offset for x in xs], [s["best"][n]["rps"] for s in summary], width=0.4, label=n)
        axes[1].bar([x + offset for x in xs], [s["best"][n]["p99_us"] / 1e3 for s in summary], width=0.4, label=n)
    for ax, title in ((axes[0], "requests/s (wrk, closed loop)"), (axes[1], "p99 latency (ms)")):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu",), default="cpu", help="cpu only (the HTTP path)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for serving_http.csv and serving_http.png")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (requests in flight)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per wrk run (default 3; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--bodies", type=int, default=64, help="distinct requests wrk cycles through")
    parser.add_argument("--nets", nargs="+", default=["mlp", "resann"], choices=["mlp", "resann"])
    parser.add_argument("--protocols", nargs="+", default=["predict", "oip"], choices=["predict", "oip"])
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk: not installed (apt-get install -y wrk)")
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    csv, summary = CsvWriter("serving_http", args.out), []
    with tempfile.TemporaryDirectory(prefix="bench_serving_http_") as workdir:
        for net in args.nets:
            model, pool = (mlp_ann(), torch.randn(4096, 256)) if net == "mlp" else (resann(), torch.randn(4096, 1, 28, 28))
            print(f"{net}: ...", flush=True)
            bench_network(net, model, pool, args, csv, summary, workdir)
    path = csv.write()
    png = os.path.join(args.out, "serving_http.png")
    plot(summary, png)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), wrk -t1 -c{args.connections}, "
          f"{args.seconds:g} s x {args.rounds} round(s), max batch {MAX_BATCH}, max wait {args.max_wait_ms} ms, "
          f"load average {os.getloadavg()[0]:.1f}, commit {csv.commit}")
    print("| net | protocol | provider | requests/s | rows/s | p50 ms | p99 ms | early-exit gain |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        for n, r in s["best"].items():
            print(f"| {s['net']} | {s['protocol']} | {n} | {r['rps']:.0f} | {r['rps'] * s['rows_per_request']:.0f} | "
                  f"{r['p50_us'] / 1e3:.2f} | {r['p99_us'] / 1e3:.2f} | "
                  f"{gain_text(s, n)} |")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
