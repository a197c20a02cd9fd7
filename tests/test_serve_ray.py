"""Replicas on Ray Serve: one local Ray instance for the module (num_cpus=2, no dashboard,
every socket on 127.0.0.1), the CLI's deployment with 2 replicas of a calibrated checkpoint:
every answer (``/predict`` and the Open Inference Protocol) equals ``predict``; a replica
killed with requests in flight fails or retries them, never loses one, and is replaced; an LM
checkpoint on 2 replicas (the same wrapper, the OpenAI routes) answers like ``generate``."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from tests.utils import free_port, http_call, requires_ext, write_lm_checkpoint, write_mlp_checkpoint

pytestmark = [
    requires_ext,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="Ray Serve not installed (pip install 'ann_kernels[ray]')"),
    pytest.mark.skipif(importlib.util.find_spec("fastapi") is None,
                       reason="fastapi / uvicorn not installed (pip install 'ann_kernels[serve]')"),
]
MODEL = "mnist"
LM_NAME = "tinylm"
BUDGET = "0.96"


def serve_args(checkpoint) -> argparse.Namespace:
    from ann_kernels.inference.commands import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", "--checkpoint", str(checkpoint), "--budget", BUDGET, "--threads", "1",
                              "--max-wait-ms", "300", "--model-name", MODEL, "--replicas", "2", "--backend", "ray"])


def replica_states(serve) -> dict:
    application = serve.status().applications.get(MODEL)
    if application is None:
        return {}
    return dict(next(iter(application.deployments.values())).replica_states)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (the classifier and the LM applications share it)."""
    from ann_kernels.serve.ray_app import local_ray

    torch.set_num_threads(1)
    port = free_port()
    context = local_ray(num_cpus=2, port=port)
    try:
        serve = context.__enter__()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"a local Ray instance could not start here: {error}")
    try:
        yield SimpleNamespace(port=port, serve=serve)
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def ray_serving(tmp_path_factory, ray_instance):
    from ann_kernels.inference.commands import build_replica_server, build_server
    from ann_kernels.serve.ray_app import server_deployment

    args = serve_args(write_mlp_checkpoint(tmp_path_factory.mktemp("ray") / MODEL))
    local, _ = build_server(args)  # the same calibration as each replica's: the oracle's thresholds
    serve = ray_instance.serve
    application = server_deployment(
        functools.partial(build_replica_server, args), replicas=2, num_cpus=0.5, drain_timeout_s=5.0,
        app_options={"model_name": MODEL, "sample_shape": (1, 28, 28)})
    serve.run(application, name=MODEL, route_prefix="/")
    yield SimpleNamespace(port=ray_instance.port, serve=serve, engine=local.engine, thresholds=list(local._thresholds))


def predict_call(port: int, x: torch.Tensor):
    return http_call(port, "POST", "/predict", json.dumps({"inputs": x.tolist()}).encode(), timeout=120)


def oip_call(port: int, x: torch.Tensor):
    header = json.dumps({"parameters": {"binary_data_output": False}, "inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": 4 * x.numel()}}]}).encode()
    return http_call(port, "POST", f"/v2/models/{MODEL}/infer", header + x.numpy().tobytes(),
                     {"Inference-Header-Content-Length": str(len(header))}, timeout=120)


def answer_rows(raw: bytes) -> tuple[list, list]:
    answer = json.loads(raw)
    if "outputs" in answer:
        out = {o["name"]: o["data"] for o in answer["outputs"]}
        return out["prediction"], out["exit_index"]
    return answer["prediction"], answer["exit_index"]


def concurrent(calls):
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001  a lost request (timeout, reset) shows here
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def batches(count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1 + i % 4, 1, 28, 28, generator=gen) for i in range(count)]


def check_equal_predict(ray_serving, x, raw) -> None:
    prediction, exit_index = answer_rows(raw)
    want = ray_serving.engine.predict(x, thresholds=ray_serving.thresholds)
    assert prediction == want.prediction.tolist() and exit_index == want.exit_index.tolist()


def test_sigterm_stops_an_idle_ray_serve_process_promptly(tmp_path):
    """``ann-kernels serve --backend ray`` on an LM checkpoint, a real process with a 60 s drain
    timeout: after one answered completion it is idle, and SIGTERM stops it (Ray Serve's drain
    of an idle replica, then Ray's shutdown) well within the drain timeout, exit status 0. Runs
    before the module's in-process Ray instance starts (its own Ray instance)."""
    checkpoint = write_lm_checkpoint(tmp_path / LM_NAME)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ann_kernels", "serve", "--checkpoint", str(checkpoint), "--backend", "ray",
         "--replicas", "1", "--threads", "1", "--drain-timeout-s", "60", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, b"")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(b"serving LM" in line for line in lines):
            assert process.poll() is None, f"serve exited early ({process.returncode}): {b''.join(lines).decode()}"
            assert time.monotonic() < deadline, "serve --backend ray did not start within 180 s"
            time.sleep(0.2)
        body = json.dumps({"model": LM_NAME, "prompt": "def f(", "max_tokens": 3, "temperature": 0}).encode()
        status, _, raw = http_call(port, "POST", "/v1/completions", body, timeout=120)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3, raw
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(20)  # the drain timeout is 60 s: an idle server must not wait it out
        except subprocess.TimeoutExpired:
            pytest.fail("an idle serve --backend ray process did not exit within 20 s of SIGTERM "
                        "(drain timeout 60 s)")
        reader.join(10)
        assert code == 0, b"".join(lines).decode()
        assert any(b"stopping" in line for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_two_replicas_answer_like_predict(ray_serving):
    assert replica_states(ray_serving.serve) == {"RUNNING": 2}
    port = ray_serving.port
    assert http_call(port, "GET", "/v2/health/ready")[0] == 200
    status, _, raw = http_call(port, "GET", f"/v2/models/{MODEL}")
    assert status == 200 and json.loads(raw)["inputs"][0]["shape"] == [-1, 1, 28, 28]
    xs = batches(16, seed=1)
    threads, results = concurrent([functools.partial(predict_call if i % 2 else oip_call, port, x)
                                   for i, x in enumerate(xs)])
    for t in threads:
        t.join(180)
    exits = set()
    for x, result in zip(xs, results):
        assert not isinstance(result, Exception) and result[0] == 200, result
        check_equal_predict(ray_serving, x, result[2])
        exits.update(answer_rows(result[2])[1])
    assert min(exits) < 2  # the budget made rows leave before the last of the 3 exits


def test_a_killed_replica_fails_or_retries_its_requests_never_loses_them(ray_serving):
    import ray

    serve, port = ray_serving.serve, ray_serving.port
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and MODEL in a["name"]]
    assert len(replicas) == 2, replicas
    xs = batches(12, seed=2)
    threads, results = concurrent([functools.partial(predict_call, port, x) for x in xs])
    time.sleep(0.1)  # rows now wait in the replicas' stage queues (max-wait 300 ms)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    for t in threads:
        t.join(180)
    failed = 0
    for x, result in zip(xs, results):
        assert not isinstance(result, Exception), f"a request was lost: {result!r}"
        status, _, raw = result
        if status == 200:
            check_equal_predict(ray_serving, x, raw)
        else:  # failed, and said so
            assert status >= 500 and raw, result
            failed += 1
    assert failed < len(xs)  # the other replica answered its share
    print(f"killed replica: {failed} of {len(xs)} requests failed with 5xx, the rest answered")
    deadline = time.monotonic() + 120
    while True:  # Ray Serve replaces the dead replica
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "SERVE_REPLICA" in a["name"] and MODEL in a["name"]}
        if replicas[0]["name"] not in names and len(names) == 2 and replica_states(serve) == {"RUNNING": 2}:
            break
        assert time.monotonic() < deadline, (names, replica_states(serve))
        time.sleep(0.5)
    x = batches(1, seed=3)[0]
    status, _, raw = predict_call(port, x)
    assert status == 200
    check_equal_predict(ray_serving, x, raw)



def test_an_lm_checkpoint_on_two_replicas_answers_like_generate(tmp_path_factory, ray_instance):
    """``serve --backend ray --replicas 2`` on an LM checkpoint (the CLI's application, at
    ``/lm``): the real openai client's greedy completions, concurrent, in every mode, and a
    streamed one, equal ``ann_kernels.generate``'s decoded text and exits."""
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install .[test])")
    import ann_kernels
    from ann_kernels.generation.checkpoint import load_lm_checkpoint
    from ann_kernels.inference.commands import add_parser
    from ann_kernels.serve.lm_command import lm_ray_application

    checkpoint = write_lm_checkpoint(tmp_path_factory.mktemp("ray_lm") / LM_NAME)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--checkpoint", str(checkpoint), "--threads", "1", "--max-wait-ms", "5",
                              "--replicas", "2", "--backend", "ray", "--drain-timeout-s", "5"])
    application, _ = lm_ray_application(args, LM_NAME, num_cpus=0.5)
    serve = ray_instance.serve
    serve.run(application, name=LM_NAME, route_prefix="/lm")
    status = serve.status().applications[LM_NAME]
    assert dict(next(iter(status.deployments.values())).replica_states) == {"RUNNING": 2}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ray_instance.port}/lm/v1", api_key="unused",
                           max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [LM_NAME]
    prompts = ["def loads(", "import re\n", "class JSON", "return obj", "    if s", "# the"]
    modes = [{}, {"mode": "self_speculative", "exit_index": 0, "draft_len": 2}, {"mode": "confidence", "threshold": 0.2}]

    def call(i):
        extra = {"early_exit": modes[i % 3]} if modes[i % 3] else None
        return client.completions.create(model=LM_NAME, prompt=prompts[i], max_tokens=6, temperature=0,
                                         extra_body=extra)

    threads, results = concurrent([functools.partial(call, i) for i in range(len(prompts))])
    streamed = list(client.completions.create(model=LM_NAME, prompt=prompts[0], max_tokens=6, temperature=0,
                                              stream=True))
    for t in threads:
        t.join(180)
    lm = load_lm_checkpoint(checkpoint)
    eos = lm.eos_token_id
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        assert not isinstance(result, Exception), result
        ref = ann_kernels.generate(lm.model, [lm.encode(prompt)], max_new_tokens=6, eos_token_id=eos, **modes[i % 3])
        choice = result.choices[0]
        assert choice.text == lm.decode([t for t in ref.tokens[0] if t != eos]), (i, prompt)
        assert choice.model_extra["exit_index"] == ref.exit_index[0]
    assert "".join(c.choices[0].text for c in streamed) == results[0].choices[0].text
    assert [e for c in streamed for e in c.choices[0].model_extra["exit_index"]] == \
        results[0].choices[0].model_extra["exit_index"]
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
