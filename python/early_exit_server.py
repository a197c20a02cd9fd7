"""Serving early exit: an ``EarlyExitServer`` merges requests from many client threads into
full stage batches (stage-level continuous batching) and answers each with what
``EarlyExitEngine.predict`` gives its rows alone.

The network is an (untrained) MLP anytime network; thresholds are calibrated so that rows
spread over all exits. Eight client threads submit requests of 1-8 rows at once, one asyncio
caller awaits ``server.infer``, one request carries a deadline; the server's live statistics
are printed at the end.

Checks (printed as ``CHECK ... ok``): every request's answer equals ``predict`` on its rows;
rows of several requests ran together (mean stage batch > the largest request); an immediate
deadline returns exit 0 answers; ``close()`` resolved every future.

    python python/early_exit_server.py [--smoke]

``--smoke`` (or ANN_EXAMPLES_SMOKE=1): fewer requests, for CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading

import torch

from ann_kernels import EarlyExitEngine, EarlyExitServer, calibrate_thresholds
from ann_kernels.inference import geometric_exit_fractions
from ann_kernels.nn import mlp_ann
from ann_kernels.ops.early_exit import exit_confidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE", "0") not in ("", "0")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp_ann(in_features=64, hidden=128, num_exits=4, num_classes=10).eval()
    pool = torch.randn(2048, 64)
    with torch.inference_mode():
        confidence = torch.stack([exit_confidence(z)[0] for z in model(pool[:512])])
    thresholds = calibrate_thresholds(confidence, geometric_exit_fractions(4, 1.0)).tolist()
    engine = EarlyExitEngine(model)

    per_thread = 20 if smoke else 200
    gen = torch.Generator().manual_seed(1)
    requests = [[pool[s:s + n] for s, n in zip(torch.randint(0, 2000, (per_thread,), generator=gen).tolist(),
                                                torch.randint(1, 9, (per_thread,), generator=gen).tolist())]
                for _ in range(8)]
    answers: dict[int, list] = {}
    server = EarlyExitServer(engine, thresholds=thresholds, max_batch_size=128, max_wait_s=0.002, sample_shape=(64,))
    with server:
        def client(i: int) -> None:
            futures = [server.submit(x) for x in requests[i]]
            answers[i] = [f.result(timeout=120) for f in futures]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        async def async_caller():
            return await server.infer(pool[:5])

        awaited = asyncio.run(async_caller())
        urgent = server.submit(pool[:4], deadline_s=0.0).result(timeout=120)
        late = [server.submit(pool[i:i + 2]) for i in range(0, 40, 2)]
        stats = server.stats()
    # close() has drained: every future is resolved.
    assert all(f.done() for f in late)
    print("CHECK close() resolved every submitted request ok")

    for i in range(8):
        for x, result in zip(requests[i], answers[i]):
            alone = engine.predict(x, thresholds=thresholds)
            assert torch.equal(result.prediction, alone.prediction) and torch.equal(result.exit_index, alone.exit_index)
    alone = engine.predict(pool[:5], thresholds=thresholds)
    assert torch.equal(awaited.prediction, alone.prediction)
    print(f"CHECK {8 * per_thread + 1} requests from 8 threads + asyncio equal predict() on their rows ok")
    assert max(stats.mean_batch_rows) > 8, stats.mean_batch_rows
    print(f"CHECK rows of several requests ran together (mean rows per stage run "
          f"{[round(r, 1) for r in stats.mean_batch_rows]}) ok")
    assert (urgent.exit_index == 0).all() and urgent.stats.deadline_exit is not None
    print("CHECK an immediate deadline returns exit-0 answers ok")
    print(f"requests {stats.requests_completed}, rows per exit {list(stats.rows_per_exit)}, mean cost "
          f"{stats.mean_flops / stats.full_flops:.2f} of full, p50 {1e3 * stats.latency_p50_s:.2f} ms, "
          f"p99 {1e3 * stats.latency_p99_s:.2f} ms")


if __name__ == "__main__":
    main()
