"""Serving early exit: an ``EarlyExitServer`` merges requests from many client threads into
full stage batches (stage-level continuous batching) and answers each with what
``EarlyExitEngine.predict`` gives its rows alone.

The network is an (untrained) MLP anytime network; thresholds are calibrated so that rows
spread over all exits. Eight client threads submit requests of 1-8 rows at once, one asyncio
caller awaits ``server.infer``, one request carries a deadline; the server's live statistics
are printed at the end.

Checks (printed as ``CHECK ... ok``): every request's answer equals ``predict`` on its rows
(exits and predictions; a row whose confidence lies within 1e-6 of a threshold may exit one
stage apart, as the server's tie rule says: the example counts such rows, and the calibrated
thresholds sit between calibration samples, so there are usually none); rows of several
requests ran together (mean stage batch > the largest request); an immediate deadline
returns exit 0 answers; ``close()`` answered every request (a result, no exception).

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
    with torch.inference_mode():  # every pool row's confidence at every exit, for the tie rule
        pool_confidence = torch.stack([exit_confidence(z)[0] for z in model(pool)])
    near_threshold = ((pool_confidence[:-1] - torch.tensor(thresholds[:-1]).unsqueeze(1)).abs() <= 1e-6).any(0)

    per_thread = 20 if smoke else 200
    gen = torch.Generator().manual_seed(1)
    starts = [torch.randint(0, 2000, (per_thread,), generator=gen).tolist() for _ in range(8)]
    requests = [[pool[s:s + n] for s, n in zip(starts[i], torch.randint(1, 9, (per_thread,), generator=gen).tolist())]
                for i in range(8)]
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
    # close() has drained: every future holds a result (f.done() would also be true for a failure).
    failures = [f.exception(timeout=0) for f in late]
    assert failures == [None] * len(late), failures
    print("CHECK close() answered every submitted request (no exception) ok")

    def matches_predict(start: int, result) -> int:
        """Compare ``result`` for pool rows start.. with predict on them; returns how many of
        its rows differ, each allowed only within 1e-6 of a threshold (one stage apart)."""
        n = result.prediction.shape[0]
        alone = engine.predict(pool[start:start + n], thresholds=thresholds)
        differ = result.exit_index != alone.exit_index
        near = near_threshold[start:start + n]
        assert not (differ & ~near).any(), f"rows {start}..{start + n}: exits differ away from any threshold"
        assert ((result.exit_index - alone.exit_index).abs() <= 1).all()
        same = ~differ
        assert torch.equal(result.prediction[same], alone.prediction[same])
        return int(differ.sum())

    flipped, used = 0, torch.zeros(pool.shape[0], dtype=torch.bool)
    for i in range(8):
        for start, result in zip(starts[i], answers[i]):
            flipped += matches_predict(start, result)
            used[start:start + result.prediction.shape[0]] = True
    used_near = int((used & near_threshold).sum())
    flipped += matches_predict(0, awaited)
    flipped += sum(matches_predict(2 * j, f.result()) for j, f in enumerate(late))
    print(f"{used_near} of the {int(used.sum())} distinct requested rows lie within 1e-6 of a threshold; "
          f"{flipped} answered rows exited one stage apart from predict (allowed only for those)")
    print(f"CHECK {8 * per_thread + 1 + len(late)} requests from 8 threads + asyncio equal predict() on their rows ok")
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
