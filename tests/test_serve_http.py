"""HTTP front (FastAPI + uvicorn) over loopback with a stdlib client: the round trip equals
predict(), /stats and /healthz, the 4xx cases, and `ann-kernels serve` as users run it."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import EarlyExitServer
from tests.early_exit_helpers import K, inputs, mlp_checkpoint, small_mlp  # noqa: F401  (fixture)
from tests.utils import requires_ext

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401

    HAVE_SERVE = True
except ImportError:
    HAVE_SERVE = False

pytestmark = [
    requires_ext,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not HAVE_SERVE, reason="fastapi / uvicorn not installed (pip install 'ann_kernels[serve]')"),
]


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def front():
    from ann_kernels.serve import start_http

    torch.set_num_threads(1)
    model = small_mlp(seed=21)
    engine = EarlyExitEngine(model)
    server = EarlyExitServer(engine, thresholds=[0.4, 0.5, 0.6, 0.0], max_batch_size=64, max_wait_s=0.001,
                             sample_shape=(16,)).start()
    http_front = start_http(server, max_body_bytes=64 * 1024)
    yield SimpleNamespace(port=http_front.port, engine=engine, server=server)
    http_front.close()
    server.close()


def test_predict_round_trip_equals_predict(front):
    x = inputs(5, seed=22)
    status, body = request(front.port, "POST", "/predict", json.dumps({"inputs": x.tolist()}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, body
    expected = front.engine.predict(torch.tensor(x.tolist()), thresholds=[0.4, 0.5, 0.6, 0.0])
    assert body["prediction"] == expected.prediction.tolist()
    assert body["exit_index"] == expected.exit_index.tolist()
    assert body["confidence"] == pytest.approx(expected.confidence.tolist(), abs=1e-5)
    assert sum(body["samples_per_exit"]) == 5 and body["latency_s"] > 0 and body["deadline_exit"] is None
    status, body = request(front.port, "POST", "/predict",
                           json.dumps({"inputs": x[:1].tolist(), "deadline_s": 30.0}).encode())
    assert status == 200 and len(body["prediction"]) == 1


def test_stats_and_healthz(front):
    request(front.port, "POST", "/predict", json.dumps({"inputs": inputs(2).tolist()}).encode())
    status, stats = request(front.port, "GET", "/stats")
    assert status == 200 and stats["requests_completed"] >= 1 and len(stats["rows_per_exit"]) == K
    for n in (1, 3, 2, 4):  # a few latencies, so that the percentiles are different requests
        request(front.port, "POST", "/predict", json.dumps({"inputs": inputs(n).tolist()}).encode())
    _, stats = request(front.port, "GET", "/stats")
    direct = front.server.stats()  # the API's answer at the same moment (nothing in flight in between)
    assert [stats[f"latency_p{q}_s"] for q in (50, 90, 99)] == [
        direct.latency_p50_s, direct.latency_p90_s, direct.latency_p99_s]
    assert stats["requests_completed"] == direct.requests_completed and direct.latency_p50_s > 0
    status, health = request(front.port, "GET", "/healthz")
    assert status == 200 and health == {"status": "ok", "num_exits": K, "sample_shape": [16]}


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, "expected a JSON object"),
        (json.dumps({"x": [[0.0] * 16]}).encode(), 422, "expected a JSON object"),
        (json.dumps({"inputs": [[0.0] * 16], "extra": 1}).encode(), 422, "unknown fields"),
        (json.dumps({"inputs": []}).encode(), 422, "inputs: expected a non-empty"),
        (json.dumps({"inputs": [[0.0] * 16, [0.0] * 3]}).encode(), 422, "rectangular"),
        (json.dumps({"inputs": [["a"] * 16]}).encode(), 422, "inputs"),
        (json.dumps({"inputs": [[0.0] * 15]}).encode(), 422, r"x: expected samples of shape \[16\]"),
        (json.dumps({"inputs": [[0.0] * 16], "deadline_s": "soon"}).encode(), 422, "deadline_s"),
        (json.dumps({"inputs": [[0.0] * 16], "deadline_s": -1}).encode(), 422, "deadline_s"),
        (json.dumps({"inputs": [[0.0] * 16] * 2000}).encode(), 413, "exceed the limit"),
    ],
    ids=["malformed", "array", "no-inputs", "unknown-field", "empty", "ragged", "strings", "shape",
         "deadline-type", "deadline-negative", "oversized"],
)
def test_bad_bodies_get_4xx(front, body, status, message):
    import re

    got, payload = request(front.port, "POST", "/predict", body, {"Content-Type": "application/json"})
    assert got == status, payload
    assert re.search(message, payload["error"]), payload
    assert request(front.port, "GET", "/healthz")[0] == 200  # and the server is unharmed


def test_oversized_chunked_body_is_cut_off(front):
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
    try:
        chunks = (b"[" + b"0.0," * 4096 for _ in range(40))  # ~640 KB, no Content-Length
        connection.request("POST", "/predict", body=chunks, encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 413
    finally:
        connection.close()


def test_wrong_method_and_path(front):
    assert request(front.port, "GET", "/predict")[0] == 405
    assert request(front.port, "GET", "/nothing")[0] == 404


def test_build_server_from_a_checkpoint_with_a_budget(mlp_checkpoint):  # noqa: F811
    from ann_kernels.inference.commands import add_parser, build_server
    from ann_kernels.serve import start_http

    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--checkpoint", str(mlp_checkpoint), "--budget", "0.97", "--threads", "1"])
    server, spec = build_server(args)
    assert server._sample_shape == (1, 28, 28)
    full = float(server.engine.calibration.exit_flops[-1])
    planned = server.engine.thresholds_for_budget(0.97 * full).tolist()
    assert server._thresholds == tuple(planned[:-1]) + (float("-inf"),)
    x = torch.randn(3, 1, 28, 28)
    with server, start_http(server) as front:
        status, body = request(front.port, "POST", "/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200 and len(body["prediction"]) == 3
    expected = server.engine.predict(x, thresholds=list(server._thresholds))
    assert body["prediction"] == expected.prediction.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_over_loopback(mlp_checkpoint):  # noqa: F811
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "ann_kernels", "serve", "--checkpoint", str(mlp_checkpoint), "--port", str(port),
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        for _ in range(600):  # up to ~60 s for torch to import on a loaded machine
            if process.poll() is not None:
                pytest.fail(f"serve exited early: {process.stdout.read().decode()}")
            try:
                status, health = request(port, "GET", "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("serve did not answer /healthz within 60 s")
        assert status == 200 and health["sample_shape"] == [1, 28, 28] and "full depth" in health["mode"]
        status, body = request(port, "POST", "/predict",
                               json.dumps({"inputs": torch.zeros(2, 1, 28, 28).tolist()}).encode())
        assert status == 200 and body["exit_index"] == [2, 2]  # the 3-exit model at full depth
    finally:
        process.terminate()
        process.wait(30)
