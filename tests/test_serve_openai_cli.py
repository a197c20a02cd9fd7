"""``ann-kernels serve`` on an LM checkpoint (a real BPE tokenizer in its run directory): a real
process serving ``/v1/completions`` to the ``openai`` client, answers equal to
``ann_kernels.generate``, ``/metrics`` counting what was served, SIGTERM draining to exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install .[test])")
pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install .[serve])")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install .[serve])")
pytest.importorskip("prometheus_client", reason="prometheus_client is not installed (pip install .[serve])")
pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is not installed (pip install tokenizers)")

import ann_kernels  # noqa: E402
from ann_kernels.generation.checkpoint import load_lm_checkpoint  # noqa: E402
from tests.utils import free_port, http_call, write_lm_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout, what, process):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"{what}: the server exited: {process.stdout.read().decode()}")
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(what)


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_serve_an_lm_checkpoint(tmp_path):
    checkpoint = write_lm_checkpoint(tmp_path / "tinylm")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ann_kernels", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--threads", "1", "--mode", "self_speculative", "--exit-index", "0", "--draft-len", "2",
         "--prefill-chunk-tokens", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    try:
        wait_until(lambda: http_call(port, "GET", "/healthz")[0] == 200, 90, "serve did not turn ready", process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tinylm"]
        prompts = ["def loads(", "import re\n"]
        out = client.completions.create(model="tinylm", prompt=prompts, max_tokens=6, temperature=0)
        full = client.completions.create(model="tinylm", prompt=prompts[0], max_tokens=6, temperature=0,
                                         extra_body={"early_exit": {"mode": "full"}})
        _, _, raw = http_call(port, "GET", "/metrics")
        text = raw.decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert "drained in" in process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    lm = load_lm_checkpoint(checkpoint)
    ref = ann_kernels.generate(lm.model, [lm.encode(p) for p in prompts], max_new_tokens=6, eos_token_id=lm.eos_token_id,
                               mode="self_speculative", exit_index=0, draft_len=2)
    eos = lm.eos_token_id
    assert [c.text for c in out.choices] == [lm.decode([t for t in r if t != eos]) for r in ref.tokens]
    assert [c.model_extra["exit_index"] for c in out.choices] == ref.exit_index
    assert full.choices[0].model_extra["exit_index"] == [2] * len(full.choices[0].model_extra["exit_index"])
    assert metric(text, "ann_kernels:generation_tokens_total") == out.usage.completion_tokens + full.usage.completion_tokens
    assert metric(text, "ann_kernels:num_requests_running") == 0
    assert metric(text, "ann_kernels:time_to_first_token_seconds_count") == 3
    assert metric(text, "ann_kernels_requests_total", protocol="openai", outcome="success") == 2
    assert 0 <= metric(text, "ann_kernels:spec_decode_acceptance_rate") <= 1


def test_serve_passes_prefill_chunk_tokens_to_the_lm_server(tmp_path):
    from ann_kernels.cli import build_parser
    from ann_kernels.serve.lm_command import build_lm_server

    checkpoint = write_lm_checkpoint(tmp_path / "tinylm")
    args = build_parser().parse_args(["serve", "--checkpoint", str(checkpoint), "--prefill-chunk-tokens", "5"])
    server, _ = build_lm_server(args)
    try:
        assert server.prefill_chunk_tokens == 5
    finally:
        server.close()
    assert build_parser().parse_args(["serve", "--checkpoint", str(checkpoint)]).prefill_chunk_tokens is None
    args = build_parser().parse_args(["serve", "--checkpoint", str(checkpoint), "--prefill-chunk-tokens", "0"])
    with pytest.raises(ValueError, match="prefill_chunk_tokens: expected None or an int >= 1, got 0"):
        build_lm_server(args)
