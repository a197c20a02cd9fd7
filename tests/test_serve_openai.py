"""The OpenAI-compatible ``/v1/completions`` over a ``GenerationServer``, driven with the real
``openai`` client over loopback: greedy completions (one, 8 concurrent clients, streamed,
early-exit modes) equal ``ann_kernels.generate``'s decoded text, stop strings, a client that
leaves mid-stream frees its row (one that leaves while queued, its queue slot), errors in OpenAI's shape (400/404/413/422/429/503)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install .[test])")
fastapi = pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install .[serve])")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install .[serve])")

import ann_kernels  # noqa: E402
from ann_kernels.generation import GenerationServer  # noqa: E402
from ann_kernels.serve import create_app  # noqa: E402
from ann_kernels.serve.runner import HttpFront  # noqa: E402
from tests.utils import CharTokenizer, WorkerGate, http_call, tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 0
NAME = "tiny"
TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(TOK.vocab_size, max_len=48)


@pytest.fixture(scope="module")
def served(model):
    server = GenerationServer(model, TOK, max_batch_size=8, max_wait_s=0.01, max_queue=8, eos_token_id=EOS)
    gate = WorkerGate(server)
    app = create_app(server, model_name=NAME, max_body_bytes=4096)
    front = HttpFront(app).start()
    front.serving = app.state.serving  # the drain gate and the in-flight count
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield server, front, client, gate
    front.close()
    server.close()


def expected(model, prompt, max_tokens, **mode):
    out = ann_kernels.generate(model, [TOK.encode(prompt)], max_new_tokens=max_tokens, eos_token_id=EOS, **mode)
    tokens, exits = out.tokens[0], out.exit_index[0]
    return TOK.decode([t for t in tokens if t != EOS]), tokens, exits


def test_models_and_a_greedy_completion(served, model):
    server, front, client, _ = served
    assert [m.id for m in client.models.list().data] == [NAME]
    out = client.completions.create(model=NAME, prompt="hello there", max_tokens=10, temperature=0)
    text, tokens, exits = expected(model, "hello there", 10)
    choice = out.choices[0]
    assert choice.text == text and choice.model_extra["exit_index"] == exits
    assert choice.finish_reason == ("stop" if EOS in tokens else "length")
    assert out.usage.prompt_tokens == len("hello there") and out.usage.completion_tokens == len(tokens)
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")


def test_eight_concurrent_clients_equal_generate(served, model):
    server, front, client, _ = served
    prompts = ["the cat", "a dog ran", "hi", "once upon", "zebra", "quiet night", "ok", "be brief"]
    modes = [{}, {"mode": "self_speculative", "exit_index": 1}, {"mode": "confidence", "threshold": 0.4}]
    results = [None] * len(prompts)
    first_step = len(server.steps()) and server.steps()[-1].index

    def call(i):
        mode = modes[i % 3]
        body = {"early_exit": mode} if mode else None
        results[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=12, temperature=0,
                                               extra_body=body)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        text, _, exits = expected(model, p, 12, **modes[i % 3])
        assert results[i].choices[0].text == text, (i, p)
        assert results[i].choices[0].model_extra["exit_index"] == exits
    steps = [r for r in server.steps() if r.index > first_step and r.kind == "decode"]
    assert max(len(r.request_ids) for r in steps) > 1  # the clients shared decode steps


def test_streaming_equals_the_completion(served, model):
    server, front, client, _ = served
    text, tokens, exits = expected(model, "stream me", 14, mode="self_speculative", exit_index=2, draft_len=3)
    extra = {"early_exit": {"mode": "self_speculative", "exit_index": 2, "draft_len": 3}}
    chunks = list(client.completions.create(model=NAME, prompt="stream me", max_tokens=14, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=extra))
    pieces = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in pieces) == text
    assert [e for c in pieces for e in c.choices[0].model_extra["exit_index"]] == exits
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(tokens)
    body = json.dumps({"model": NAME, "prompt": "stream me", "max_tokens": 3, "temperature": 0, "stream": True})
    status, headers, raw = http_call(front.port, "POST", "/v1/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n") and raw.startswith(b"data: {")


def test_stop_strings(served, model):
    server, front, client, _ = served
    full, _, _ = expected(model, "the end", 20)
    assert len(full) >= 5
    stop = full[2:4]
    out = client.completions.create(model=NAME, prompt="the end", max_tokens=20, temperature=0, stop=[stop, "qqq"])
    assert out.choices[0].text == full[: full.find(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="the end", max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[: full.find(stop)]


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.01)


def test_a_client_leaving_mid_stream_frees_its_row(served):
    server, front, client, gate = served
    before = server.stats()
    gate.hold(skip=2)  # the prefill and the first decode step pass; the second waits
    stream = client.completions.create(model=NAME, prompt="go", max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    assert gate.entered.wait(30)
    stream.close()  # the client hangs up
    wait_for(lambda: front.serving.in_flight == 0)
    gate.release()
    wait_for(lambda: server.stats().requests_running == 0)
    after = server.stats()
    assert after.requests_finished["cancelled"] == before.requests_finished["cancelled"] + 1
    assert after.generated_tokens - before.generated_tokens < 40


def error_of(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


@pytest.mark.parametrize("kwargs, status, param", [
    ({"model": "other"}, 404, "model"),
    ({"n": 0}, 422, "n"),
    ({"n": 17}, 422, "n"),  # over MAX_N
    ({"prompt": ["a", "b", "c", "d", "e"], "n": 13}, 422, "n"),  # 65 choices: over MAX_PROMPTS
    ({"n": 2, "best_of": 3}, 422, "best_of"),
    ({"temperature": 3.0}, 422, "temperature"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": 400}, 422, None),  # longer than the model's context
    ({"logprobs": 2}, 400, "logprobs"),  # top alternatives: not available
    ({"logprobs": 6}, 422, "logprobs"),
    ({"extra_body": {"early_exit": {"mode": "fast"}}}, 422, None),
    ({"extra_body": {"early_exit": {"mode": "self_speculative"}}}, 422, None),
    ({"extra_body": {"colour": "red"}}, 422, "colour"),
    ({"prompt": "UPPER CASE"}, 422, None),  # outside the tokenizer's alphabet
])
def test_bad_requests_in_openai_error_shape(served, kwargs, status, param):
    server, front, client, _ = served
    args = {"model": NAME, "prompt": "hi", "max_tokens": 4, **kwargs}
    code, body = error_of(lambda: client.completions.create(**args))
    assert code == status and set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_malformed_oversized_and_unknown_routes(served):
    server, front, client, _ = served
    for raw, status in ((b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"model": NAME}).encode(), 422),
                        (json.dumps({"prompt": "a" * 5000}).encode(), 413)):
        code, _, body = http_call(front.port, "POST", "/v1/completions", raw, {"Content-Type": "application/json"})
        error = json.loads(body)["error"]
        assert code == status and error["message"] and "type" in error and "code" in error, (raw[:20], body)
    code, _, body = http_call(front.port, "POST", "/v1/embeddings", b"{}")
    assert code == 404 and json.loads(body)["error"]["message"]
    code, _, body = http_call(front.port, "GET", "/stats")
    assert code == 200 and json.loads(body)["requests_submitted"] >= 1


def test_a_full_queue_answers_429(served):
    server, front, client, gate = served
    gate.hold()
    held = server.submit([1, 2], max_new_tokens=2)
    assert gate.entered.wait(30)
    queued = [server.submit([3], max_new_tokens=2) for _ in range(server.max_queue)]
    try:
        code, body = error_of(lambda: client.completions.create(model=NAME, prompt="hi", max_tokens=2))
        assert code == 429 and body["code"] == "server_busy" and body["type"] == "rate_limit_error"
    finally:
        gate.release()
    for f in [held, *queued]:
        assert f.result(60).finish_reason in ("length", "eos")


def test_drain_answers_accepted_requests_and_refuses_new_ones(model):
    server = GenerationServer(model, TOK, max_batch_size=4)
    gate = WorkerGate(server)
    app = create_app(server, model_name=NAME)
    front = HttpFront(app).start()
    state = app.state.serving
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)
    gate.hold()
    results = []
    worker = threading.Thread(target=lambda: results.append(
        client.completions.create(model=NAME, prompt="abc", max_tokens=6, temperature=0)))
    worker.start()
    assert gate.entered.wait(30)  # the request is accepted and in the prefill
    drained = []
    drainer = threading.Thread(target=lambda: drained.append(front.drain(30)))
    drainer.start()
    wait_for(lambda: state.draining)
    code, _, body = http_call(front.port, "POST", "/v1/completions",
                              json.dumps({"model": NAME, "prompt": "x"}).encode())
    assert code == 503 and json.loads(body)["error"]["type"] == "server_error"
    gate.release()
    worker.join(60)
    drainer.join(60)
    server.close()
    assert drained == [True] and len(results[0].choices[0].text) >= 0
    assert results[0].usage.completion_tokens == 6 or results[0].choices[0].finish_reason == "stop"


def test_metrics_count_what_was_served(served):
    from prometheus_client.parser import text_string_to_metric_families

    server, front, client, _ = served
    client.completions.create(model=NAME, prompt="count me", max_tokens=5, temperature=0,
                              extra_body={"early_exit": {"mode": "self_speculative", "exit_index": 0}})
    code, headers, raw = http_call(front.port, "GET", "/metrics")
    assert code == 200
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    stats = server.stats()
    value = lambda name: sum(s.value for s in samples[name])  # noqa: E731
    assert value("ann_kernels:generation_tokens_total") == stats.generated_tokens
    assert value("ann_kernels:exit_tokens_total") == stats.generated_tokens
    assert value("ann_kernels:spec_decode_num_draft_tokens_total") == stats.drafted_tokens > 0
    assert value("ann_kernels:mean_exit") == pytest.approx(stats.mean_exit)
    finished = sum(stats.requests_finished.values())
    assert value("ann_kernels:request_success_total") == finished
    assert value("ann_kernels:time_to_first_token_seconds_count") <= finished
    assert value("ann_kernels:inter_token_latency_seconds_count") > 0
    assert value("ann_kernels:num_requests_running") == 0


def test_prompt_lists_stream_per_choice_and_seeded_sampling_repeats(served, model):
    server, front, client, _ = served
    prompts = ["first one", "second"]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model=NAME, prompt=prompts, max_tokens=7, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [expected(model, p, 7)[0] for p in prompts]
    sampled = [client.completions.create(model=NAME, prompt="roll", max_tokens=8, temperature=0.9, top_p=0.95,
                                         seed=11, extra_body={"top_k": 20}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    ref = ann_kernels.generate(model, [TOK.encode("roll")], max_new_tokens=8, eos_token_id=EOS, do_sample=True,
                               temperature=0.9, top_p=0.95, top_k=20, generator=torch.Generator().manual_seed(11))
    assert sampled[0] == TOK.decode([t for t in ref.tokens[0] if t != EOS])


def test_a_client_leaving_a_non_streamed_request_cancels_it(served):
    server, front, client, gate = served
    before = server.stats().requests_finished["cancelled"]
    gate.hold(skip=1)  # the prefill passes; the first decode step waits
    impatient = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=NAME, prompt="slow", max_tokens=30, temperature=0)
    wait_for(lambda: front.serving.in_flight == 0)  # the handler saw the disconnect and cancelled
    gate.release()
    wait_for(lambda: server.stats().requests_running == 0)
    assert server.stats().requests_finished["cancelled"] == before + 1


def test_a_client_leaving_while_queued_frees_its_queue_slot(served):
    """The worker is held with the queue full, the last queued request an HTTP client's; the
    client gives up: its request leaves the queue while the worker is still held (one more
    request is accepted), answered "cancelled", never generated."""
    from ann_kernels.generation import ServerBusyError

    server, front, client, gate = served
    before = server.stats().requests_finished["cancelled"]
    gate.hold()
    held = server.submit([1, 2], max_new_tokens=2)
    assert gate.entered.wait(30)  # the worker is inside held's prefill
    queued = [server.submit([3], max_new_tokens=2) for _ in range(server.max_queue - 1)]
    try:
        impatient = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):  # its request is the last of a full queue
            impatient.completions.create(model=NAME, prompt="late", max_tokens=30, temperature=0)
        wait_for(lambda: front.serving.in_flight == 0)  # the handler saw the disconnect and cancelled
        assert server.stats().requests_waiting == server.max_queue - 1  # its slot is free already
        queued.append(server.submit([4], max_new_tokens=2))  # and taken
        with pytest.raises(ServerBusyError):
            server.submit([5], max_new_tokens=2)
    finally:
        gate.release()
    for f in [held, *queued]:
        assert f.result(60).finish_reason in ("length", "eos")
    wait_for(lambda: server.stats().requests_finished["cancelled"] == before + 1)
