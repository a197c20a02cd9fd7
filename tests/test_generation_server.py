"""``GenerationServer``: iteration-level batching (asserted on the step log, not on timing),
per-row independence (greedy and seeded sampling equal ``ann_kernels.generate`` on the
prompt alone, in every mode), streams (sync and async), stop strings, cancellation, deadlines,
drain on close, backpressure, a failing request failing alone, bad arguments."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import ann_kernels
from ann_kernels.generation import GenerationServer, ServerBusyError
from tests.utils import CharTokenizer, WorkerGate, ragged_prompts, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [
    {"mode": "full"},
    {"mode": "self_speculative", "exit_index": 1, "draft_len": 3},
    {"mode": "confidence", "threshold": 0.4},
]


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(40, max_len=48)


def reference(model, prompt, **kw):
    out = ann_kernels.generate(model, [prompt], **kw)
    return out.tokens[0], out.exit_index[0]


def test_rows_equal_generate_alone_in_a_busy_batch_every_mode(model):
    prompts = ragged_prompts(7, 40, min_len=1, max_len=9, seed=3)
    with GenerationServer(model, max_batch_size=4, max_wait_s=0.05) as server:
        jobs = []
        for i, p in enumerate(prompts):
            kw = {**MODES[i % 3], "max_new_tokens": 4 + 2 * i}
            jobs.append((p, kw, server.submit(p, **kw)))
        for p, kw, future in jobs:
            out = future.result(60)
            tokens, exits = reference(model, p, **kw)
            assert out.token_ids == tokens and out.exits == exits, kw
            assert out.finish_reason == "length" and out.prompt_tokens == len(p)
            assert out.ttft_s is not None and len(out.inter_token_s) == len(tokens) - 1
        log = server.steps()
    decodes = [r for r in log if r.kind == "decode"]
    assert max(len(r.request_ids) for r in decodes) > 1  # rows really shared steps
    assert all(len(r.request_ids) <= 4 for r in log)
    assert {r.mode for r in decodes} == {"full", "self_speculative", "confidence"}


def test_seeded_sampling_equals_generate_with_that_generator(model):
    prompt = [3, 7, 11]
    kw = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "max_new_tokens": 8}
    ref = ann_kernels.generate(model, [prompt], generator=torch.Generator().manual_seed(5), **kw).tokens[0]
    with GenerationServer(model, max_batch_size=4) as server:
        others = [server.submit([1 + i], do_sample=True, max_new_tokens=8) for i in range(3)]
        mine = server.submit(prompt, seed=5, **kw)
        assert mine.result(60).token_ids == ref
        for f in others:
            f.result(60)


def test_a_request_submitted_mid_generation_joins_the_running_batch(model):
    with GenerationServer(model, max_batch_size=4, max_wait_s=0) as server:
        gate = WorkerGate(server)
        first = server.stream([5, 6, 7], max_new_tokens=20)
        next(first)  # A is generating
        gate.hold()
        assert gate.entered.wait(30)  # the worker is inside A's next decode step
        second = server.submit([9, 2], max_new_tokens=3)
        gate.release()
        assert second.result(60).token_ids == reference(model, [9, 2], max_new_tokens=3)[0]
        rest = list(first)
        assert rest[-1].finish_reason == "length"
        a, b = first.request_id, second.request_id
        log = server.steps()
    prefill_b = next(r.index for r in log if r.kind == "prefill" and b in r.request_ids)
    assert a not in next(r for r in log if r.index == prefill_b).request_ids  # B prefilled alone
    shared = [r for r in log if r.kind == "decode" and {a, b} <= set(r.request_ids)]
    assert shared, "B never decoded in the same step as A"
    after_b = [r for r in log if r.kind == "decode" and a in r.request_ids and r.index > shared[-1].index]
    assert after_b, "A should still be generating after B finished (B joined, it did not wait for A)"


def test_stream_sync_and_async_give_the_completion(model):
    tok = CharTokenizer()
    with GenerationServer(model, tok, max_new_tokens=10) as server:
        chunks = list(server.stream("hello"))
        out = server.submit("hello").result(60)
        assert [t for c in chunks for t in c.token_ids] == out.token_ids
        assert "".join(c.text for c in chunks) == out.text == tok.decode(out.token_ids)
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])

        async def collect():
            return [c async for c in server.stream("hello")]

        async_chunks = asyncio.run(collect())
        assert [t for c in async_chunks for t in c.token_ids] == out.token_ids


def test_stop_strings_cut_the_text_and_free_the_row(model):
    tok = CharTokenizer()
    with GenerationServer(model, tok, max_new_tokens=24) as server:
        full = server.submit("the cat").result(60)
        assert len(full.text) >= 6
        stop = full.text[3:5]
        cut = full.text[: full.text.find(stop)]
        out = server.submit("the cat", stop=[stop, "never-seen"]).result(60)
        assert out.finish_reason == "stop" and out.text == cut
        assert len(out.token_ids) < len(full.token_ids)
        streamed = list(server.stream("the cat", stop=stop))
        assert "".join(c.text for c in streamed) == cut and streamed[-1].finish_reason == "stop"
        assert server.stats().requests_running == 0


def test_eos_ends_a_row_and_is_not_in_the_text(model):
    tok = CharTokenizer()
    prompt = "abc"
    free = reference(model, tok.encode(prompt), max_new_tokens=12)[0]
    eos = free[2]  # the third token the model makes: call it the end of text
    ref = ann_kernels.generate(model, [tok.encode(prompt)], max_new_tokens=12, eos_token_id=eos).tokens[0]
    with GenerationServer(model, tok, eos_token_id=eos, max_new_tokens=12) as server:
        out = server.submit(prompt).result(60)
    assert out.token_ids == ref and out.finish_reason == "eos"
    assert out.text == tok.decode([t for t in ref if t != eos])


def test_cancel_and_deadline_free_the_row(model):
    with GenerationServer(model, max_batch_size=2, max_wait_s=0) as server:
        gate = WorkerGate(server)
        stream = server.stream([4, 4, 4], max_new_tokens=40)
        next(stream)
        assert stream.cancel()
        rest = list(stream)
        assert rest[-1].finish_reason == "cancelled"
        with pytest.raises(Exception):
            stream.future.result(1)  # cancelled future
        cancelled_id = stream.request_id
        gate.hold()
        late = server.submit([8, 1], max_new_tokens=40, deadline_s=0.05)
        assert gate.entered.wait(30)
        threading.Event().wait(0.1)  # the deadline passes while the worker is held
        gate.release()
        out = late.result(60)
        assert out.finish_reason == "deadline" and len(out.token_ids) < 40
        after = server.submit([1], max_new_tokens=2).result(60)
        log = server.steps()
        stats = server.stats()
    assert stats.requests_running == 0 and stats.requests_finished["cancelled"] == 1
    last_cancelled = max(r.index for r in log if cancelled_id in r.request_ids)
    assert all(cancelled_id not in r.request_ids for r in log if r.index > last_cancelled)
    assert after.finish_reason == "length"


def test_a_queued_request_past_its_deadline_leaves_the_queue_at_once(model):
    """B waits behind a long A (one row); its deadline passes in the queue: it is answered
    "deadline" while A still runs (not once it reaches the front) and its queue slot is free."""
    with GenerationServer(model, max_batch_size=1, max_queue=2, max_wait_s=0) as server:
        gate = WorkerGate(server)
        seen = {}

        def on_finish(completion):  # worker thread, between iterations
            if completion.request_id == late.request_id:
                seen["step"] = server.steps()[-1].index
                seen["waiting"] = server.stats().requests_waiting

        server.add_listener(on_finish)
        running = server.stream([5, 6, 7], max_new_tokens=40)
        next(running)  # A is generating
        gate.hold()
        assert gate.entered.wait(30)  # the worker is inside A's next decode step
        late = server.submit([8, 1], max_new_tokens=5, deadline_s=1e-9)  # past once the worker looks
        behind = server.submit([2, 3], max_new_tokens=3)
        with pytest.raises(ServerBusyError):
            server.submit([4], max_new_tokens=3)  # A runs, B and C fill the queue
        gate.release()
        out = late.result(60)
        assert out.finish_reason == "deadline" and out.token_ids == [] and out.ttft_s is None
        assert behind.result(60).token_ids == reference(model, [2, 3], max_new_tokens=3)[0]
        assert list(running)[-1].finish_reason == "length"
        log, stats = server.steps(), server.stats()
    assert seen["waiting"] == 1  # only C waits: B's slot was freed when it left
    a = running.request_id
    assert any(r.kind == "decode" and a in r.request_ids and r.index > seen["step"] for r in log), \
        "B left only once A finished (when it reached the front), not at once"
    assert all(late.request_id not in r.request_ids for r in log)  # never prefilled
    assert stats.requests_finished["deadline"] == 1 and stats.requests_waiting == 0


def test_a_cancelled_queued_request_leaves_the_queue_at_once(model):
    """B (a stream) and C (a future) wait behind a long A (one row) in a full queue; cancelling
    them frees their queue slots at once (two more requests are accepted while the worker is
    still held inside A's step), they are answered "cancelled" while A still runs, and they
    are never prefilled."""
    with GenerationServer(model, max_batch_size=1, max_queue=2, max_wait_s=0) as server:
        gate = WorkerGate(server)
        seen = {}

        def on_finish(completion):  # worker thread, between iterations
            if completion.request_id in (queued_stream.request_id, queued.request_id):
                seen[completion.request_id] = server.steps()[-1].index

        server.add_listener(on_finish)
        running = server.stream([5, 6, 7], max_new_tokens=40)
        next(running)  # A is generating
        gate.hold()
        assert gate.entered.wait(30)  # the worker is inside A's next decode step
        queued_stream = server.stream([8, 1], max_new_tokens=5)
        queued = server.submit([2, 3], max_new_tokens=3)
        with pytest.raises(ServerBusyError):
            server.submit([4], max_new_tokens=3)
        assert queued_stream.cancel() and queued.cancel()
        assert server.stats().requests_waiting == 0  # both slots free while the worker is held
        later = [server.submit([4], max_new_tokens=3), server.submit([9, 9], max_new_tokens=2)]
        gate.release()
        chunks = list(queued_stream)
        assert [c.finish_reason for c in chunks] == ["cancelled"] and chunks[0].token_ids == []
        assert [f.result(60).token_ids for f in later] == [reference(model, [4], max_new_tokens=3)[0],
                                                           reference(model, [9, 9], max_new_tokens=2)[0]]
        assert list(running)[-1].finish_reason == "length"
        log, stats = server.steps(), server.stats()
    a = running.request_id
    for rid in (queued_stream.request_id, queued.request_id):
        assert all(rid not in r.request_ids for r in log)  # never prefilled
        assert any(r.kind == "decode" and a in r.request_ids and r.index > seen[rid] for r in log), \
            "a cancelled request was answered only once A finished (when it reached the front)"
    assert stats.requests_finished["cancelled"] == 2 and stats.requests_rejected == 1
    assert stats.requests_waiting == 0 and stats.requests_running == 0


def test_a_lone_request_is_prefilled_without_waiting_for_company(model):
    """One client, one request after another, on a server whose idle wait for a burst is 30 s:
    each request waits alone, so it is prefilled at once (answered long before 30 s); the wait
    is only for a burst (more than one request waiting)."""
    with GenerationServer(model, max_batch_size=4, max_wait_s=30.0) as server:
        outs = []
        for prompt in ([3, 1, 4], [1, 5], [9, 2, 6]):
            try:
                outs.append((prompt, server.submit(prompt, max_new_tokens=3).result(10)))
            except TimeoutError:
                pytest.fail("a lone request waited for company (max_wait_s=30)")
        log = server.steps()
    for prompt, out in outs:
        assert out.token_ids == reference(model, prompt, max_new_tokens=3)[0]
    assert [r.request_ids for r in log if r.kind == "prefill"] == [(0,), (1,), (2,)]


def test_close_drains_every_accepted_request(model):
    server = GenerationServer(model, max_batch_size=2).start()
    futures = [server.submit([i + 1], max_new_tokens=6) for i in range(5)]
    assert server.close(timeout=60)
    assert all(f.result(0).finish_reason == "length" and len(f.result(0).token_ids) == 6 for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        server.submit([1])
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


def test_backpressure_answers_busy(model):
    with GenerationServer(model, max_batch_size=1, max_queue=1, max_wait_s=0) as server:
        gate = WorkerGate(server)
        gate.hold()
        running = server.submit([1, 2], max_new_tokens=3)
        assert gate.entered.wait(30)  # held inside the first request's prefill
        queued = server.submit([3], max_new_tokens=3)
        with pytest.raises(ServerBusyError, match="busy"):
            server.submit([4], max_new_tokens=3)
        gate.release()
        assert running.result(60).finish_reason == queued.result(60).finish_reason == "length"
        assert server.stats().requests_rejected == 1


def test_a_failing_request_fails_alone(model):
    poison = 39
    with GenerationServer(model, max_batch_size=4, max_wait_s=0.2) as server:
        embed = server.adapter.embed

        def picky(tokens, positions):
            if tokens.shape[1] > 1 and bool((tokens == poison).any()):
                raise RuntimeError("poisoned prompt")
            return embed(tokens, positions)

        server.adapter.embed = picky
        good = [server.submit([1, 2, 3], max_new_tokens=4), server.submit([5, 6], max_new_tokens=4)]
        bad = server.submit([poison, 2, 3], max_new_tokens=4)
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.result(60)
        for f, p in zip(good, ([1, 2, 3], [5, 6])):
            assert f.result(60).token_ids == reference(model, p, max_new_tokens=4)[0]
        assert server.stats().requests_failed == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 100}, "max length"),
    ({"mode": "fast"}, "mode"),
    ({"mode": "self_speculative"}, "exit_index"),
    ({"mode": "confidence"}, "threshold"),
    ({"temperature": 0.0, "do_sample": True}, "temperature"),
    ({"seed": "x"}, "seed"),
    ({"stop": ["a"]}, "tokenizer"),
    ({"deadline_s": -1}, "deadline_s"),
    ({"colour": 1}, "unknown"),
])
def test_bad_arguments_name_themselves(model, kwargs, match):
    with GenerationServer(model) as server:
        with pytest.raises(ValueError, match=match):
            server.submit([1, 2], **kwargs)
        with pytest.raises(ValueError, match="prompt"):
            server.submit("text without a tokenizer")
        with pytest.raises(ValueError, match="out of range"):
            server.submit([1, 99])
    with pytest.raises(ValueError, match="max_batch_size"):
        GenerationServer(model, max_batch_size=0)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        GenerationServer(model, prefill_chunk_tokens=0)
    with pytest.raises(ValueError, match="exit_index"):
        GenerationServer(model, mode="self_speculative")


def test_a_request_mode_does_not_inherit_the_server_mode_settings(model):
    with GenerationServer(model, mode="self_speculative", exit_index=1, draft_len=2, max_new_tokens=5) as server:
        default = server.submit([2, 3]).result(60)
        full = server.submit([2, 3], mode="full").result(60)
        confident = server.submit([2, 3], mode="confidence", threshold=0.3).result(60)
    spec = reference(model, [2, 3], max_new_tokens=5, mode="self_speculative", exit_index=1, draft_len=2)
    assert (default.token_ids, default.exits) == spec and default.mode == "self_speculative"
    assert (full.token_ids, full.exits) == reference(model, [2, 3], max_new_tokens=5)
    assert (confident.token_ids, confident.exits) == reference(model, [2, 3], max_new_tokens=5, mode="confidence",
                                                               threshold=0.3)


@pytest.mark.parametrize("mode", MODES, ids=[m["mode"] for m in MODES])
def test_a_long_prompt_joining_a_running_batch_is_prefilled_in_chunks(model, mode):
    """Chunked prefill: a 30-token prompt (29 positions to prefill) joining a running row is
    prefilled in ceil(29 / 8) = 4 chunks with a decode step of the running row between each
    two (the step log), never whole; both rows' greedy tokens equal ``generate`` alone."""
    long = ragged_prompts(1, 40, min_len=30, max_len=31, seed=9)[0]
    with GenerationServer(model, max_batch_size=4, max_wait_s=0, prefill_chunk_tokens=8) as server:
        gate = WorkerGate(server)
        running = server.stream([5, 6, 7], max_new_tokens=30)
        next(running)  # A is generating
        gate.hold()
        assert gate.entered.wait(30)  # the worker is inside A's next decode step
        joining = server.submit(long, max_new_tokens=8, **mode)
        short = server.submit([4, 4], max_new_tokens=3)  # short: prefilled whole, at once
        gate.release()
        out = joining.result(60)
        assert (out.token_ids, out.exits) == reference(model, long, max_new_tokens=8, **mode)
        assert short.result(60).token_ids == reference(model, [4, 4], max_new_tokens=3)[0]
        assert list(running)[-1].finish_reason == "length"
        assert running.future.result().token_ids == reference(model, [5, 6, 7], max_new_tokens=30)[0]
        log = server.steps()
    a, b, c = running.request_id, joining.request_id, short.request_id
    chunks = [r for r in log if r.kind == "prefill_chunk" and b in r.request_ids]
    assert len(chunks) == 4 and all(r.request_ids == (b,) for r in chunks)
    assert not any(r.kind == "prefill" and b in r.request_ids for r in log)  # never prefilled whole
    assert any(r.kind == "prefill" and c in r.request_ids for r in log)
    for first, then in zip(chunks, chunks[1:]):
        assert any(r.kind == "decode" and a in r.request_ids and first.index < r.index < then.index for r in log)
    decodes_b = [r for r in log if r.kind == "decode" and b in r.request_ids]
    assert decodes_b and decodes_b[0].index > chunks[-1].index
    if mode["mode"] == "full":  # it joined A's batch
        assert a in decodes_b[0].request_ids


def test_a_cancelled_chunked_prefill_frees_its_slot(model):
    """A long prompt cancelled between its chunks (from inside its second chunk's forward)
    stops there, answered "cancelled"; the next long prompt reuses the reserved slot and
    still equals ``generate``."""
    long = ragged_prompts(2, 40, min_len=30, max_len=31, seed=4)
    with GenerationServer(model, max_batch_size=3, max_wait_s=0, prefill_chunk_tokens=8) as server:
        gate = WorkerGate(server)
        embed, calls, victim = server.adapter.embed, [], []

        def cancel_in_second_chunk(tokens, positions):
            if tokens.shape[1] > 1:  # a prefill chunk (decode steps of full mode embed one position)
                calls.append(tokens.shape[1])
                if len(calls) == 2:
                    victim[0].cancel()
            return embed(tokens, positions)

        running = server.stream([5, 6, 7], max_new_tokens=40)
        next(running)
        gate.hold()
        assert gate.entered.wait(30)
        victim.append(server.submit(long[0], max_new_tokens=4))
        server.adapter.embed = cancel_in_second_chunk
        gate.release()
        deadline = time.monotonic() + 60
        while server.stats().requests_finished["cancelled"] < 1:  # the worker answered it
            assert time.monotonic() < deadline, "the cancelled chunked prefill was never answered"
            time.sleep(0.01)
        follower = server.submit(long[1], max_new_tokens=5)
        assert follower.result(60).token_ids == reference(model, long[1], max_new_tokens=5)[0]
        assert running.future.result(60).token_ids == reference(model, [5, 6, 7], max_new_tokens=40)[0]
        log = server.steps()
        stats = server.stats()
    assert victim[0].cancelled() and stats.requests_finished["cancelled"] == 1
    assert sum(1 for r in log if victim[0].request_id in r.request_ids) == 2  # its two chunks, nothing more
    assert sum(1 for r in log if r.kind == "prefill_chunk" and follower.request_id in r.request_ids) >= 2


def test_a_chunked_prompt_joins_a_full_batch_into_its_own_reserved_slot(model):
    """With every other slot taken by running rows, the chunked prompt's reserved slot (the
    last) is where the batch puts it when it joins: its prefilled cache stays in place."""
    long = ragged_prompts(1, 40, min_len=30, max_len=31, seed=9)[0]
    with GenerationServer(model, max_batch_size=2, max_wait_s=0, prefill_chunk_tokens=8) as server:
        gate = WorkerGate(server)
        running = server.stream([5, 6, 7], max_new_tokens=30)
        next(running)
        gate.hold()
        assert gate.entered.wait(30)
        joining = server.submit(long, max_new_tokens=8)
        gate.release()
        assert joining.result(60).token_ids == reference(model, long, max_new_tokens=8)[0]
        assert running.future.result(60).token_ids == reference(model, [5, 6, 7], max_new_tokens=30)[0]
        log = server.steps()
    b = joining.request_id
    assert sum(1 for r in log if r.kind == "prefill_chunk" and b in r.request_ids) == 4
    assert any(r.kind == "decode" and r.request_ids == (running.request_id, b) for r in log)
