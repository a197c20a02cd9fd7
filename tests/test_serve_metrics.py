"""Prometheus /metrics scraped over loopback and parsed with prometheus_client's own parser:
request counts by protocol and outcome, latency / queue histograms, rows per exit, mean cost,
stage batch sizes, in-flight and queued — each equal to what was served; one registry per app."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import EarlyExitServer
from tests.early_exit_helpers import K, inputs, small_mlp
from tests.utils import http_call, requires_ext

pytest.importorskip("fastapi", reason="fastapi / uvicorn not installed (pip install 'ann_kernels[serve]')")
parser = pytest.importorskip("prometheus_client.parser",
                             reason="prometheus_client not installed (pip install 'ann_kernels[serve]')")

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]

THRESHOLDS = [0.4, 0.5, 0.6, 0.0]


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} of every sample on /metrics."""
    status, headers, raw = http_call(port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in parser.text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[name, frozenset(labels.items())]


def predict_body(x: torch.Tensor) -> bytes:
    return json.dumps({"inputs": x.tolist()}).encode()


def oip_body(x: torch.Tensor) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


def test_metrics_count_what_was_served():
    from ann_kernels.serve import start_http

    engine = EarlyExitEngine(small_mlp(seed=41))
    server = EarlyExitServer(engine, thresholds=THRESHOLDS, max_batch_size=32, max_wait_s=0.001,
                             sample_shape=(16,)).start()
    with start_http(server, model_name="m1") as front:
        exits, rows = Counter(), 0
        for i in range(8):  # /predict, 1..8 rows
            x = inputs(1 + i, seed=50 + i)
            status, _, raw = http_call(front.port, "POST", "/predict", predict_body(x))
            assert status == 200
            exits.update(json.loads(raw)["exit_index"])
            rows += x.shape[0]
        for i in range(5):  # OIP, 3 rows each
            x = inputs(3, seed=70 + i)
            status, _, raw = http_call(front.port, "POST", "/v2/models/m1/infer", oip_body(x))
            assert status == 200
            exits.update(next(o for o in json.loads(raw)["outputs"] if o["name"] == "exit_index")["data"])
            rows += 3
        assert http_call(front.port, "POST", "/predict", b"{not json")[0] == 400
        assert http_call(front.port, "POST", "/predict", predict_body(torch.zeros(1, 15)))[0] == 422
        assert http_call(front.port, "POST", "/v2/models/m1/infer", b"[]")[0] == 400
        samples = scrape(front.port)
        stats = server.stats()

    def requests(protocol, outcome):
        return value(samples, "ann_kernels_requests_total", model="m1", protocol=protocol, outcome=outcome)

    assert requests("predict", "success") == 8 and requests("oip", "success") == 5
    assert requests("predict", "invalid") == 2 and requests("oip", "invalid") == 1
    assert requests("predict", "error") == requests("oip", "unavailable") == 0
    for protocol, answered in (("predict", 10), ("oip", 6)):
        assert value(samples, "ann_kernels_request_duration_seconds_count", model="m1", protocol=protocol) == answered
        assert value(samples, "ann_kernels_request_duration_seconds_bucket", model="m1", protocol=protocol,
                     le="+Inf") == answered
    assert value(samples, "ann_kernels_request_queue_seconds_count", model="m1") == 13  # the successful ones
    queue_sum = value(samples, "ann_kernels_request_queue_seconds_sum", model="m1")
    latency_sum = sum(value(samples, "ann_kernels_request_duration_seconds_sum", model="m1", protocol=p)
                      for p in ("predict", "oip"))
    assert 0 <= queue_sum < latency_sum
    # rows per exit: what the answers said
    assert [value(samples, "ann_kernels_exit_rows_total", model="m1", exit=str(k)) for k in range(K)] == \
        [exits[k] for k in range(K)]
    assert sum(exits.values()) == rows
    assert value(samples, "ann_kernels_mean_flops_per_row", model="m1") == pytest.approx(stats.mean_flops)
    assert 0 < stats.mean_flops <= value(samples, "ann_kernels_full_flops_per_row", model="m1")
    # every stage run observed once, with its rows; stage 0 saw every row
    for k in range(K):
        runs = value(samples, "ann_kernels_stage_runs_total", model="m1", stage=str(k))
        assert value(samples, "ann_kernels_stage_batch_rows_count", model="m1", stage=str(k)) == runs
        assert value(samples, "ann_kernels_stage_duration_seconds_count", model="m1", stage=str(k)) == runs
        assert value(samples, "ann_kernels_queued_rows", model="m1", stage=str(k)) == 0
    assert value(samples, "ann_kernels_stage_batch_rows_sum", model="m1", stage="0") == rows
    reached = rows - exits[0]
    assert value(samples, "ann_kernels_stage_batch_rows_sum", model="m1", stage="1") == reached
    assert value(samples, "ann_kernels_requests_in_flight", model="m1") == 0
    server.close()


def test_two_apps_have_their_own_registries_and_in_flight_counts():
    """Two servers in one process: each /metrics shows only its own model; a request waiting
    in a stage queue shows as in flight and queued."""
    from ann_kernels.serve import start_http

    slow = EarlyExitServer(EarlyExitEngine(small_mlp(seed=42)), max_batch_size=64, max_wait_s=30.0,
                           sample_shape=(16,)).start()  # full depth; rows wait up to 30 s for company
    fast = EarlyExitServer(EarlyExitEngine(small_mlp(seed=43)), sample_shape=(16,)).start()
    with start_http(slow, model_name="slow") as slow_front, start_http(fast, model_name="fast") as fast_front:
        future = slow.submit(inputs(3))
        samples = scrape(slow_front.port)
        assert value(samples, "ann_kernels_requests_in_flight", model="slow") == 1
        assert value(samples, "ann_kernels_queued_rows", model="slow", stage="0") == 3
        assert all(dict(labels).get("model") in (None, "slow") for _, labels in samples)
        assert http_call(fast_front.port, "POST", "/predict", predict_body(inputs(2)))[0] == 200
        fast_samples = scrape(fast_front.port)
        assert value(fast_samples, "ann_kernels_requests_total", model="fast", protocol="predict",
                     outcome="success") == 1
        assert ("ann_kernels_requests_total", frozenset({"model": "fast", "protocol": "predict",
                                                          "outcome": "success"}.items())) not in scrape(slow_front.port)
        slow.close()  # the drain runs the queued rows at once
        assert future.result(timeout=30).exit_index.tolist() == [K - 1] * 3
    fast.close()
