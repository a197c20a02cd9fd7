"""Open Inference Protocol v2 over loopback: the real ``tritonclient.http`` client with its
defaults (binary tensors in and out) and with JSON, raw JSON bodies (nested and flat data),
every answer equal to ``EarlyExitEngine.predict`` row by row; malformed bodies get 400 naming
the field (wrong datatype, shape / data mismatch, bad binary sizes, ...)."""

from __future__ import annotations

import gzip
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import EarlyExitServer
from tests.early_exit_helpers import inputs, mlp_http_front, small_mlp
from tests.utils import http_call, requires_ext

tritonclient_http = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] not installed (pip install 'tritonclient[http]')")
pytest.importorskip("fastapi", reason="fastapi / uvicorn not installed (pip install 'ann_kernels[serve]')")

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]

THRESHOLDS = [0.4, 0.5, 0.6, 0.0]
MODEL = "mlp"


@pytest.fixture(scope="module")
def front():
    with mlp_http_front(THRESHOLDS, MODEL, max_body_bytes=64 * 1024) as (http_front, engine, server):
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{http_front.port}", network_timeout=60.0)
        try:
            yield SimpleNamespace(port=http_front.port, engine=engine, server=server, client=client)
        finally:
            client.close()


def expected(front, x: np.ndarray):
    return front.engine.predict(torch.from_numpy(x), thresholds=THRESHOLDS)


def check_rows(front, x: np.ndarray, prediction, exit_index, confidence) -> None:
    want = expected(front, x)
    assert np.asarray(prediction).tolist() == want.prediction.tolist()
    assert np.asarray(exit_index).tolist() == want.exit_index.tolist()
    assert np.asarray(confidence, dtype=np.float32) == pytest.approx(want.confidence.numpy(), abs=1e-5)


def test_health_and_metadata_through_tritonclient(front):
    client = front.client
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("other")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    assert {(o["name"], o["datatype"]) for o in meta["outputs"]} == {
        ("prediction", "INT64"), ("exit_index", "INT64"), ("confidence", "FP32")}
    status, _, body = http_call(front.port, "GET", "/v2/health/live")
    assert status == 200 and json.loads(body) == {"live": True}  # KServe's client reads the keys
    status, _, body = http_call(front.port, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True}


@pytest.mark.parametrize("rows", [1, 5, 37])
def test_tritonclient_defaults_binary_in_and_out_equal_predict(front, rows):
    x = inputs(rows, seed=100 + rows).numpy()
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary by default
    assert tensor._get_binary_data() is not None
    result = front.client.infer(MODEL, [tensor], request_id=f"req-{rows}")
    response = result.get_response()
    assert response["id"] == f"req-{rows}" and response["model_name"] == MODEL
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in response["outputs"]}
    assert sizes == {"prediction": 8 * rows, "exit_index": 8 * rows, "confidence": 4 * rows}  # binary out
    check_rows(front, x, result.as_numpy("prediction"), result.as_numpy("exit_index"), result.as_numpy("confidence"))


def test_tritonclient_json_in_and_out_equal_predict(front):
    x = inputs(9, seed=7).numpy()
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=False)
               for name in ("prediction", "exit_index", "confidence")]
    result = front.client.infer(MODEL, [tensor], outputs=outputs)
    assert all("data" in o and "parameters" not in o for o in result.get_response()["outputs"])
    check_rows(front, x, result.as_numpy("prediction"), result.as_numpy("exit_index"), result.as_numpy("confidence"))


def test_tritonclient_subset_of_outputs_gzip_and_deadline(front):
    x = inputs(6, seed=8).numpy()
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = front.client.infer(MODEL, [tensor], outputs=[tritonclient_http.InferRequestedOutput("exit_index")],
                                request_compression_algorithm="gzip", parameters={"deadline_s": 30.0})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["exit_index"]
    assert result.as_numpy("exit_index").tolist() == expected(front, x).exit_index.tolist()
    # deadline 0: every row leaves at exit 0, and the answer says the deadline cut it
    result = front.client.infer(MODEL, [tensor], parameters={"deadline_s": 0.0})
    assert result.as_numpy("exit_index").tolist() == [0] * 6
    assert result.get_response()["parameters"]["deadline_exit"] >= 0


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_raw_json_nested_and_flat_data(front, layout):
    x = inputs(4, seed=9).numpy()
    data = x.tolist() if layout == "nested" else x.reshape(-1).tolist()
    body = {"id": "abc", "parameters": {"deadline_s": 30},
            "inputs": [{"name": "input", "shape": [4, 16], "datatype": "FP32", "data": data}]}
    status, headers, raw = http_call(front.port, "POST", f"/v2/models/{MODEL}/versions/1/infer",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert status == 200 and "inference-header-content-length" not in headers, raw
    answer = json.loads(raw)
    assert answer["id"] == "abc"
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["prediction"]["shape"] == [4] and out["confidence"]["datatype"] == "FP32"
    check_rows(front, x, out["prediction"]["data"], out["exit_index"]["data"], out["confidence"]["data"])


def binary_body(header: dict, payload: bytes, header_length: int | None = None):
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return text + payload, {"Inference-Header-Content-Length": str(length)}


def good_input(**changes) -> dict:
    entry = {"name": "input", "shape": [2, 16], "datatype": "FP32", "data": [0.5] * 32}
    entry.update(changes)
    return entry


ROW_BYTES = np.zeros((2, 16), np.float32).tobytes()  # 128 bytes
BAD = {
    "datatype": ({"inputs": [good_input(datatype="INT64")]}, None, r"inputs\[0\]\.datatype: expected 'FP32'.*'INT64'"),
    "datatype-unknown": ({"inputs": [good_input(datatype="FLOAT")]}, None,
                         r"inputs\[0\]\.datatype: 'FLOAT' is not an Open Inference Protocol datatype"),
    "data-count": ({"inputs": [good_input(data=[0.5] * 31)]}, None,
                   r"inputs\[0\]\.data: 31 values do not match shape \[2, 16\] \(32 values\)"),
    "data-ragged": ({"inputs": [good_input(data=[[0.5] * 16, [0.5] * 15])]}, None, r"inputs\[0\]\.data:"),
    "data-strings": ({"inputs": [good_input(data=["a"] * 32)]}, None, r"inputs\[0\]\.data:"),
    "data-missing": ({"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32"}]}, None,
                     r"inputs\[0\]\.data: missing"),
    "shape-sample": ({"inputs": [good_input(shape=[4, 8])]}, None, r"inputs\[0\]\.shape: expected \[n, 16\]"),
    "shape-type": ({"inputs": [good_input(shape="2x16")]}, None, r"inputs\[0\]\.shape: expected a list of ints"),
    "shape-empty-batch": ({"inputs": [good_input(shape=[0, 16], data=[])]}, None, r"inputs\[0\]\.shape: .*n >= 1"),
    "input-name": ({"inputs": [good_input(name="x")]}, None, r"inputs\[0\]\.name: expected 'input'"),
    "two-inputs": ({"inputs": [good_input(), good_input()]}, None, r"inputs: expected a list with one tensor"),
    "no-inputs": ({"id": "a"}, None, r"inputs: expected a list with one tensor"),
    "id-type": ({"id": 3, "inputs": [good_input()]}, None, r"id: expected a string, got 3"),
    "output-name": ({"inputs": [good_input()], "outputs": [{"name": "logits"}]}, None, r"outputs\[0\]\.name"),
    "output-flag": ({"inputs": [good_input()], "outputs": [{"name": "prediction", "parameters": {"binary_data": 1}}]},
                    None, r"outputs\[0\]\.parameters\.binary_data: expected true or false"),
    "binary-output-flag": ({"parameters": {"binary_data_output": "yes"}, "inputs": [good_input()]}, None,
                           r"parameters\.binary_data_output: expected true or false"),
    "deadline": ({"parameters": {"deadline_s": -1}, "inputs": [good_input()]}, None,
                 r"parameters\.deadline_s: expected finite seconds >= 0, got -1"),
    "binary-size": ({"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 124}}]}, ROW_BYTES[:124],
                    r"inputs\[0\]\.parameters\.binary_data_size: expected 128 bytes for shape \[2, 16\] of FP32, "
                    r"got 124"),
    "binary-short": ({"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 128}}]}, ROW_BYTES[:100],
                     r"inputs\[0\]\.parameters\.binary_data_size: 128 bytes, but only 100 bytes"),
    "binary-extra": ({"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 128}}]}, ROW_BYTES + b"\0" * 8,
                     r"Inference-Header-Content-Length: 8 bytes after the \d+-byte JSON header belong to no input"),
    "binary-and-data": ({"inputs": [good_input(parameters={"binary_data_size": 128})]}, ROW_BYTES,
                        r"inputs\[0\]: has both data and parameters\.binary_data_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_bodies_get_400_naming_the_field(front, case):
    header, payload, message = BAD[case]
    if payload is None:
        body, headers = json.dumps(header).encode(), {}
    else:
        body, headers = binary_body(header, payload)
    status, _, raw = http_call(front.port, "POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 400, raw
    assert re.search(message, json.loads(raw)["error"]), raw


def test_framing_errors_unknown_models_and_limits(front):
    path = f"/v2/models/{MODEL}/infer"
    body, _ = binary_body({"inputs": [good_input()]}, b"")
    for length in ("abc", "0", str(len(body) + 1)):
        status, _, raw = http_call(front.port, "POST", path, body, {"Inference-Header-Content-Length": length})
        assert status == 400 and "Inference-Header-Content-Length" in json.loads(raw)["error"], raw
    status, _, raw = http_call(front.port, "POST", path, json.dumps({"inputs": [good_input()]}).encode() + ROW_BYTES)
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]  # binary without the header
    status, _, raw = http_call(front.port, "POST", path, b"\x1f\x8b garbage", {"Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip" in json.loads(raw)["error"]
    bomb = gzip.compress(b" " * (256 * 1024))  # 64 KiB limit once decompressed
    status, _, raw = http_call(front.port, "POST", path, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in json.loads(raw)["error"]
    status, _, raw = http_call(front.port, "POST", "/v2/models/other/infer", json.dumps({}).encode())
    assert status == 404 and "'other': not served here" in json.loads(raw)["error"]
    status, _, raw = http_call(front.port, "GET", f"/v2/models/{MODEL}/versions/2")
    assert status == 404 and "version '2'" in json.loads(raw)["error"]
    with pytest.raises(tritonclient_http.InferenceServerException, match="not served here"):
        tensor = tritonclient_http.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
        front.client.infer("other", [tensor])
    for method, path, code in (("GET", "/v2/nothing", 404), ("GET", f"/v2/models/{MODEL}/infer", 405)):
        status, _, raw = http_call(front.port, method, path)
        assert status == code and path in json.loads(raw)["error"], raw  # errors are {"error": ...} everywhere
    assert front.client.is_server_ready()  # and the server is unharmed


def test_misaligned_binary_input_is_copied_before_the_model(front):
    from ann_kernels.serve.oip_tensors import decode_infer_request
    from ann_kernels.serve.state import describe_server

    x = inputs(3, seed=11).numpy()
    model = describe_server(front.server, MODEL)
    for pad in range(4):  # header lengths of every residue mod 4
        header = {"id": " " * pad, "inputs": [{"name": "input", "shape": [3, 16], "datatype": "FP32",
                                               "parameters": {"binary_data_size": x.nbytes}}]}
        text = json.dumps(header).encode()
        decoded = decode_infer_request(bytearray(text + x.tobytes()), str(len(text)), model, (16,))
        assert torch.equal(decoded.x, torch.from_numpy(x)) and decoded.x.data_ptr() % 4 == 0


def test_model_config_through_tritonclient(front):
    config = front.client.get_model_config(MODEL)
    assert config == front.client.get_model_config(MODEL, "1")
    assert config["name"] == MODEL and config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [16]}]
    assert {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]} == {
        "prediction": ("TYPE_INT64", [1]), "exit_index": ("TYPE_INT64", [1]), "confidence": ("TYPE_FP32", [1])}
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 1000}
    assert {"model_configuration", "statistics"} <= set(front.client.get_server_metadata()["extensions"])
    with pytest.raises(tritonclient_http.InferenceServerException, match="not served here"):
        front.client.get_model_config("other")


def test_statistics_through_tritonclient_count_what_was_served(front):
    def model_stats(**kwargs):
        answer = front.client.get_inference_statistics(**kwargs)
        assert [s["name"] for s in answer["model_stats"]] == [MODEL]
        return answer["model_stats"][0]

    before, executions_before = model_stats(model_name=MODEL), front.server.stats().stage_runs[0]
    rows = (1, 5, 3, 8)
    for n in rows:  # through OIP and through /predict: the statistics count both
        x = inputs(n, seed=200 + n).numpy()
        tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        front.client.infer(MODEL, [tensor])
    status, _, raw = http_call(front.port, "POST", "/predict", json.dumps({"inputs": inputs(2, seed=3).tolist()}).encode())
    assert status == 200, raw
    status, _, raw = http_call(front.port, "POST", f"/v2/models/{MODEL}/infer", json.dumps({"inputs": []}).encode())
    assert status == 400, raw  # one failure
    status, _, _ = http_call(front.port, "POST", "/v2/models/other/infer", json.dumps({}).encode())
    assert status == 404  # another model's: not counted
    after = model_stats(model_name=MODEL, model_version="1")
    assert model_stats() == after  # GET /v2/models/stats: all models (this one)

    def delta(*keys):
        a, b = after, before
        for key in keys:
            a, b = a[key], b[key]
        return a - b

    assert delta("inference_count") == sum(rows) + 2
    assert delta("execution_count") == front.server.stats().stage_runs[0] - executions_before >= 1
    assert delta("inference_stats", "success", "count") == len(rows) + 1
    assert delta("inference_stats", "queue", "count") == len(rows) + 1
    assert delta("inference_stats", "fail", "count") == 1
    success_ns, queue_ns = delta("inference_stats", "success", "ns"), delta("inference_stats", "queue", "ns")
    assert 0 < queue_ns < success_ns  # queue time is part of each request's time
    assert delta("inference_stats", "fail", "ns") > 0
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 1e12  # ms since epoch
    assert after["version"] == "1"
    with pytest.raises(tritonclient_http.InferenceServerException, match="not served here"):
        front.client.get_inference_statistics("other")


def test_config_and_statistics_before_any_request():
    from ann_kernels.serve.oip import model_config, model_statistics
    from ann_kernels.serve.state import ServingState, describe_server

    server = EarlyExitServer(EarlyExitEngine(small_mlp(seed=31)), max_batch_size=8, max_wait_s=0.0)  # not started
    state = ServingState(server, describe_server(server, "fresh"), max_body_bytes=1024)
    config = model_config(state)
    assert config["input"][0]["dims"] == [-1] and config["max_batch_size"] == 8  # shape not known yet
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 0}
    (stats,) = model_statistics(state)["model_stats"]
    assert stats["inference_count"] == stats["execution_count"] == stats["last_inference"] == 0
    assert stats["inference_stats"] == {key: {"count": 0, "ns": 0} for key in ("success", "fail", "queue")}
