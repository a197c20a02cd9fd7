"""The HTTP front (``ann-kernels serve``) from a client's side, with only the standard library.

Starts an ``EarlyExitServer`` with its FastAPI + uvicorn front on an ephemeral loopback port
(what ``ann-kernels serve --checkpoint runs/x/last.pt --port 8000`` runs), then talks to it
with ``urllib``: ``POST /predict`` (JSON in, JSON out), ``GET /stats``, ``GET /healthz``, and a
malformed body. Needs the ``[serve]`` extra (``pip install -e '.[serve]'``); without it, it
prints ``SKIP`` with the front's own message (how to install them) and exits 0.

Checks (printed as ``CHECK ... ok``): the HTTP answers equal ``EarlyExitEngine.predict``; a
malformed body gets 400 and an oversized one 413; /stats counts the requests.

    python python/http_client.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request

import torch

from ann_kernels import EarlyExitEngine, EarlyExitServer
from ann_kernels.nn import mlp_ann


def call(url: str, body: bytes | None = None):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke or os.environ.get("ANN_EXAMPLES_SMOKE", "0") not in ("", "0")
    from ann_kernels import serve

    try:
        serve.require_serve_extra()
    except ImportError as error:  # the convention (python/README.md): SKIP <reason>, exit 0
        print(f"SKIP {error}")
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp_ann(in_features=32, hidden=64, num_exits=3, num_classes=10).eval()
    engine = EarlyExitEngine(model)
    thresholds = [0.15, 0.15, 0.0]
    requests = 5 if smoke else 50
    with EarlyExitServer(engine, thresholds=thresholds, sample_shape=(32,)) as server, \
            serve.start_http(server, max_body_bytes=16 * 1024) as front:
        print(f"serving on {front.url}")
        status, health = call(front.url + "/healthz")
        assert status == 200 and health["status"] == "ok"
        for i in range(requests):
            x = torch.randn(1 + i % 8, 32)
            status, answer = call(front.url + "/predict", json.dumps({"inputs": x.tolist()}).encode())
            assert status == 200, answer
            expected = engine.predict(torch.tensor(x.tolist()), thresholds=thresholds)
            assert answer["prediction"] == expected.prediction.tolist()
            assert answer["exit_index"] == expected.exit_index.tolist()
        print(f"CHECK {requests} HTTP answers equal EarlyExitEngine.predict ok (last: {answer})")
        status, error = call(front.url + "/predict", b"{not json")
        assert status == 400, (status, error)
        status, too_big = call(front.url + "/predict", json.dumps({"inputs": [[0.0] * 32] * 150}).encode())  # ~24 KB
        assert status == 413, (status, too_big)
        print(f"CHECK malformed body -> 400 ({error['error'][:40]}...), oversized -> 413 ok")
        status, stats = call(front.url + "/stats")
        assert status == 200 and stats["requests_completed"] == requests
        print(f"CHECK /stats counts {stats['requests_completed']} requests, rows per exit {stats['rows_per_exit']} ok")


if __name__ == "__main__":
    main()
