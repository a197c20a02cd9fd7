"""Graceful drain: SIGTERM to a real ``ann-kernels serve`` process with requests in flight
(readiness 503 at once, new requests 503, every accepted request answered, exit 0; the
objects alive after loading were frozen out of the garbage collector first), and the drain
deadline (requests still waiting are answered 503, never dropped)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import EarlyExitServer
from tests.early_exit_helpers import inputs, mlp_checkpoint, small_mlp  # noqa: F401  (fixture)
from tests.utils import free_port, http_call, requires_ext

pytest.importorskip("fastapi", reason="fastapi / uvicorn not installed (pip install 'ann_kernels[serve]')")

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, seconds: float, what: str, process=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"serve exited early ({process.returncode}): {process.stdout.read().decode()}")
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{what} within {seconds} s")


def in_threads(calls):
    """Run each ``call()`` in its own thread; returns (threads, results list filled in place)."""
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001  a lost request shows as an exception here
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def test_sigterm_drains_a_real_serve_process(mlp_checkpoint):  # noqa: F811
    from ann_kernels.inference.engine import EarlyExitEngine as Engine
    from ann_kernels.train.runs import load_trained

    port = free_port()
    process = subprocess.Popen(  # rows wait up to 3 s per stage queue for company: requests stay in flight
        [sys.executable, "-m", "ann_kernels", "serve", "--checkpoint", str(mlp_checkpoint), "--port", str(port),
         "--threads", "1", "--max-wait-ms", "3000", "--max-batch-size", "4096", "--drain-timeout-s", "20",
         "--model-name", "mnist"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    try:
        wait_until(lambda: http_call(port, "GET", "/v2/health/ready")[0] == 200, 60, "serve did not turn ready",
                   process)
        xs = [torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(6)]
        calls = [lambda x=x: http_call(port, "POST", "/predict", json.dumps({"inputs": x.tolist()}).encode())
                 for x in xs[:4]]
        for x in xs[4:]:
            header = json.dumps({"parameters": {"binary_data_output": True}, "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": 4 * x.numel()}}]}).encode()
            calls.append(lambda h=header, x=x: http_call(port, "POST", "/v2/models/mnist/infer",
                                                         h + x.numpy().tobytes(),
                                                         {"Inference-Header-Content-Length": str(len(h))}))
        threads, results = in_threads(calls)
        wait_until(lambda: json.loads(http_call(port, "GET", "/stats")[2])["requests_in_flight"] == 6, 20,
                   "the 6 requests were not in flight")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: http_call(port, "GET", "/v2/health/ready")[0] == 503, 5, "readiness did not turn 503")
        assert any(r is None for r in results), "the requests finished before the drain could be checked"
        status, _, raw = http_call(port, "POST", "/predict", json.dumps({"inputs": xs[0].tolist()}).encode())
        assert status == 503 and "draining" in json.loads(raw)["error"]
        assert http_call(port, "GET", "/v2/health/live")[0] == 200 and http_call(port, "GET", "/healthz")[0] == 503
        for t in threads:
            t.join(60)
        assert process.wait(30) == 0
        output = process.stdout.read().decode()
        assert "drained in" in output and "6 requests completed, 0 failed, all accepted" in output, output
        frozen = re.search(r"gc: froze (\d+) objects alive after loading", output)  # --no-gc-freeze not given
        assert frozen and int(frozen.group(1)) > 10000, output  # torch alone tracks ~10^5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    model, _, _ = load_trained(mlp_checkpoint)
    engine = Engine(model)
    for i, (x, (status, headers, raw)) in enumerate(zip(xs, results)):  # every accepted request answered
        assert status == 200, raw
        want = engine.predict(x)  # full depth: no budget given
        if i >= 4:  # OIP, binary out
            n = int(headers["inference-header-content-length"])
            outputs = json.loads(raw[:n])["outputs"]
            assert [o["name"] for o in outputs] == ["prediction", "exit_index", "confidence"]
            got = np.frombuffer(raw[n:n + 16], dtype=np.int64).tolist()
        else:
            got = json.loads(raw)["prediction"]
        assert got == want.prediction.tolist()
    with pytest.raises(OSError):  # and nothing listens any more
        http_call(port, "GET", "/v2/health/live", timeout=5)


def test_drain_deadline_answers_the_waiting_requests_503():
    from ann_kernels.serve import start_http

    server = EarlyExitServer(EarlyExitEngine(small_mlp(seed=44)), max_batch_size=64, max_wait_s=30.0,
                             sample_shape=(16,)).start()  # rows would wait 30 s for company
    front = start_http(server, model_name="m")
    body = json.dumps({"inputs": inputs(2).tolist()}).encode()
    threads, results = in_threads([lambda: http_call(front.port, "POST", "/predict", body)] * 3)
    wait_until(lambda: server.in_flight() == 3, 20, "the 3 requests were not in flight")
    start = time.perf_counter()
    assert front.drain(timeout_s=0.3) is False  # the deadline passed with 3 requests waiting
    assert time.perf_counter() - start < 10
    for t in threads:
        t.join(30)
    for status, _, raw in results:
        assert status == 503 and "drain deadline passed" in json.loads(raw)["error"]
    server.close()  # their rows still run (nobody waits for them any more)
    assert server.stats().requests_completed == 3


def test_drain_finishes_in_flight_requests_then_stops():
    from ann_kernels.serve import start_http

    server = EarlyExitServer(EarlyExitEngine(small_mlp(seed=45)), max_batch_size=64, max_wait_s=0.5,
                             sample_shape=(16,)).start()
    front = start_http(server, model_name="m")
    x = inputs(2, seed=3)
    body = json.dumps({"inputs": x.tolist()}).encode()
    threads, results = in_threads([lambda: http_call(front.port, "POST", "/predict", body)] * 3)
    wait_until(lambda: server.in_flight() == 3, 20, "the 3 requests were not in flight")
    assert front.drain(timeout_s=20) is True
    for t in threads:
        t.join(30)
    want = server.engine.predict(x).prediction.tolist()
    assert [json.loads(raw)["prediction"] for _, _, raw in results] == [want] * 3
    with pytest.raises(OSError):
        http_call(front.port, "GET", "/v2/health/live", timeout=5)
    server.close()


def test_serve_flags_model_name_default_and_replicas_need_ray(mlp_checkpoint, capsys):  # noqa: F811
    import argparse

    from ann_kernels import cli
    from ann_kernels.inference.commands import add_parser, model_name_of

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--checkpoint", str(mlp_checkpoint)])
    assert model_name_of(args) == "run" and args.backend == "local" and args.replicas == 1  # runs/<name>/last.pt
    assert args.drain_timeout_s == 30.0 and args.gc_freeze is True
    assert parser.parse_args(["serve", "--checkpoint", "x/last.pt", "--no-gc-freeze"]).gc_freeze is False
    assert model_name_of(parser.parse_args(["serve", "--checkpoint", "x/last.pt", "--model-name", "m"])) == "m"
    assert cli.main(["serve", "--checkpoint", str(mlp_checkpoint), "--replicas", "2"]) == 2
    assert "replicas: 2 replicas need --backend ray" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", str(mlp_checkpoint), "--drain-timeout-s", "-1"]) == 2
    assert "drain-timeout-s: expected finite seconds >= 0, got -1.0" in capsys.readouterr().err
