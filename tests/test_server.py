"""EarlyExitServer: many client threads get predict()'s answers row by row; close() drains;
a failing stage fails only its requests; bad input fails only its future; the latency bound
at light load; deadlines on a sleeping stage; asyncio; statistics."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch
from torch import nn

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import EarlyExitResult, EarlyExitServer
from ann_kernels.nn import MultiExitNetwork
from ann_kernels.ops.early_exit import exit_confidence_reference
from tests.early_exit_helpers import CountingSleep, K, inputs, safe_thresholds, simulate, small_mlp, tuple_net
from tests.utils import DEVICES, requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]
INF = math.inf


def thresholds_for(model, x, quantile=0.5):
    _, _, _, conf = simulate(model.cpu(), x.cpu(), [0.0] * model.num_exits)
    return safe_thresholds(conf, quantile)


def request_sizes(total: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    sizes, left = [], total
    while left:
        n = min(left, int(torch.randint(1, 9, (1,), generator=gen)))
        sizes.append(n)
        left -= n
    return sizes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", ["mlp", "tuple"])
def test_many_threads_get_predicts_answers_row_by_row(device, net):
    model = small_mlp(seed=3) if net == "mlp" else tuple_net(seed=3)
    x = inputs(600, seed=4)
    thresholds = thresholds_for(model, x)
    model, x = model.to(device), x.to(device)
    engine = EarlyExitEngine(model)
    expected = engine.predict(x, thresholds=thresholds)
    sizes = request_sizes(600, seed=5)
    starts = [0] + list(torch.tensor(sizes).cumsum(0)[:-1].tolist())
    results: dict[int, object] = {}
    errors = []
    with EarlyExitServer(engine, thresholds=thresholds, max_batch_size=48, max_wait_s=0.001) as server:

        def client(worker: int):
            try:
                mine = list(range(worker, len(sizes), 6))
                futures = [(i, server.submit(x[starts[i]:starts[i] + sizes[i]])) for i in mine]
                for i, future in futures:
                    results[i] = future.result(timeout=60)
            except Exception as error:  # noqa: BLE001  (surfaced below)
                errors.append(error)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = server.stats()
    assert not errors, errors
    ordered = [results[i] for i in range(len(sizes))]
    assert [r.prediction.shape[0] for r in ordered] == sizes
    assert torch.equal(torch.cat([r.prediction for r in ordered]), expected.prediction)
    assert torch.equal(torch.cat([r.exit_index for r in ordered]), expected.exit_index)
    assert torch.allclose(torch.cat([r.confidence for r in ordered]), expected.confidence, atol=1e-5)
    for r in ordered:
        assert sum(r.stats.samples_per_exit) == r.prediction.shape[0]
        assert r.prediction.device == x.device
    assert stats.requests_completed == len(sizes) and stats.requests_in_flight == 0
    assert stats.rows_completed == 600
    assert stats.rows_per_exit == expected.stats.samples_per_exit
    assert stats.mean_flops == pytest.approx(expected.stats.mean_flops)
    assert stats.queue_depths == (0,) * model.num_exits
    assert max(stats.mean_batch_rows) > 8  # rows of several requests ran together
    # the percentiles are those of the answers' own latencies (rank int(q n), as stats() documents)
    latencies = sorted(r.stats.total_seconds for r in ordered)
    for q, value in ((0.5, stats.latency_p50_s), (0.9, stats.latency_p90_s), (0.99, stats.latency_p99_s)):
        assert value == latencies[min(len(latencies) - 1, int(q * len(latencies)))]


def test_close_drains_every_request():
    model = small_mlp(seed=6)
    engine, x = EarlyExitEngine(model), inputs(300, seed=7)
    thresholds = thresholds_for(model, x)
    expected = engine.predict(x, thresholds=thresholds)
    server = EarlyExitServer(engine, thresholds=thresholds, max_batch_size=256, max_wait_s=10.0).start()
    futures = [server.submit(x[i:i + 3]) for i in range(0, 300, 3)]
    server.close()  # max_wait_s = 10 s: only the drain can have run these
    assert all(f.done() for f in futures)
    assert torch.equal(torch.cat([f.result().exit_index for f in futures]), expected.exit_index)
    assert torch.equal(torch.cat([f.result().prediction for f in futures]), expected.prediction)
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(x[:1])
    with pytest.raises(RuntimeError, match="not started"):
        EarlyExitServer(engine).submit(x[:1])


class Poisoned(nn.Module):
    """Raises on any batch holding a row whose first feature is >= 1e3."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, h):
        if bool((h[:, 0] >= 1e3).any()):
            raise RuntimeError("poisoned row")
        return self.inner(h)


def test_a_failing_stage_fails_only_its_requests():
    base = small_mlp(seed=8)
    model = MultiExitNetwork([Poisoned(base.stages[0])] + list(base.stages[1:]), list(base.heads), num_classes=5)
    engine, x = EarlyExitEngine(model), inputs(40, seed=9)
    expected = engine.predict(x, thresholds=[INF] * K)
    bad = x[:2].clone()
    bad[1, 0] = 1e4
    # max_wait_s large and batches of 4 rows: the poisoned request shares its run with one other.
    with EarlyExitServer(engine, thresholds=[INF] * K, max_batch_size=4, max_wait_s=0.5) as server:
        futures = [server.submit(x[i:i + 2]) for i in range(0, 20, 2)]
        poisoned = server.submit(bad)
        more = [server.submit(x[i:i + 2]) for i in range(20, 40, 2)]
        with pytest.raises(RuntimeError, match="poisoned row"):
            poisoned.result(timeout=60)
        # The request that shared the poisoned run failed too; every other one succeeded.
        outcomes = [f.exception(timeout=60) for f in futures + more]
        assert sum(e is not None for e in outcomes) <= 1
        for i, (f, error) in enumerate(zip(futures + more, outcomes)):
            if error is None:
                assert torch.equal(f.result().prediction, expected.prediction[2 * i:2 * i + 2])
        after = server.submit(x[:2]).result(timeout=60)  # and the server keeps serving
        assert torch.equal(after.prediction, expected.prediction[:2])
        stats = server.stats()
    assert stats.requests_failed == 1 + sum(e is not None for e in outcomes)


def test_bad_input_fails_only_that_future():
    model = small_mlp(seed=10)
    engine, x = EarlyExitEngine(model), inputs(10, seed=11)
    with EarlyExitServer(engine, max_batch_size=8, max_wait_s=0.001) as server:
        first = server.submit(torch.randn(2, 17))  # the first shape is not trusted before it runs
        with pytest.raises(ValueError, match=r"x: the model failed on samples of shape \[17\]"):
            first.result(timeout=60)
        assert torch.equal(server.submit(x).result(timeout=60).prediction, engine.predict(x).prediction)
        cases = {
            "shape": (server.submit(torch.randn(3, 17)), ValueError, r"x: expected samples of shape \[16\]"),
            "dtype": (server.submit(x.double()), TypeError, "x: expected dtype torch.float32"),
            "empty": (server.submit(x[:0]), ValueError, "x: expected a non-empty batch"),
            "type": (server.submit([[0.0] * 16]), TypeError, "x: expected a tensor"),
            "deadline": (server.submit(x, deadline_s=-1), ValueError, "deadline_s"),
        }
        good = server.submit(x)
        for name, (future, kind, message) in cases.items():
            with pytest.raises(kind, match=message):
                future.result(timeout=60)
        assert torch.equal(good.result(timeout=60).prediction, engine.predict(x).prediction)


def test_light_load_latency_is_bounded_by_max_wait_not_batch_size():
    """A 4096-row batch never fills at light load: a request waits max_wait_s, not for a full
    batch. As an ordering: the same row sent at once to a server waiting 5 ms and to one
    waiting 300 ms is answered by the first before the second, each only after its own wait."""
    model = small_mlp(seed=12)
    engine = EarlyExitEngine(model)
    x = inputs(3, seed=13)
    short = EarlyExitServer(engine, thresholds=[0.5] * K, max_batch_size=4096, max_wait_s=0.005)
    long = EarlyExitServer(engine, thresholds=[0.5] * K, max_batch_size=4096, max_wait_s=0.3)
    with short, long:
        for server in (short, long):
            server.submit(x).result(timeout=60)  # warm-up (FLOP counting, first calls)
        for i in range(3):
            done_at = {}
            futures = {name: server.submit(x[i:i + 1]) for name, server in (("short", short), ("long", long))}
            for name, future in futures.items():
                future.add_done_callback(lambda f, name=name: done_at.setdefault(name, time.perf_counter()))
            answers = {name: f.result(timeout=60) for name, f in futures.items()}
            assert done_at["short"] < done_at["long"]
            # each waited its own max_wait_s for a fuller batch; the short wait ends before the long one
            assert 0.005 <= answers["short"].queue_s < 0.3 <= answers["long"].queue_s
            assert answers["short"].stats.total_seconds < answers["long"].stats.total_seconds
            assert torch.equal(answers["short"].prediction, answers["long"].prediction)


def test_deadline_on_a_sleeping_stage_is_honoured():
    base = small_mlp(seed=14)
    stages = list(base.stages)
    slow = stages[2] = CountingSleep(stages[2], 0.2)
    model = MultiExitNetwork(stages, list(base.heads), num_classes=5)
    engine, x = EarlyExitEngine(model), inputs(6, seed=15)
    with torch.no_grad():
        exit1 = model(x)[1].argmax(dim=1)
    with EarlyExitServer(engine, thresholds=[INF] * K, max_batch_size=64, max_wait_s=0.001) as server:
        warm = server.submit(x).result(timeout=60)  # measures the stages at this batch size
        assert (warm.exit_index == K - 1).all()
        calls = slow.calls
        result = server.submit(x, deadline_s=0.1).result(timeout=60)
        assert slow.calls == calls, "a stage measured at 0.2 s started for a 0.1 s deadline"
        assert (result.exit_index == 1).all() and torch.equal(result.prediction, exit1)
        assert result.stats.deadline_exit == 2
        relaxed = server.submit(x, deadline_s=30.0).result(timeout=60)
        assert (relaxed.exit_index == K - 1).all() and relaxed.stats.deadline_exit is None


def test_asyncio_infer_equals_predict():
    model = small_mlp(seed=16)
    engine, x = EarlyExitEngine(model), inputs(64, seed=17)
    thresholds = thresholds_for(model, x)
    with EarlyExitServer(engine, thresholds=thresholds, max_batch_size=64, max_wait_s=0.005) as server:

        async def main():
            return await asyncio.gather(*(server.infer(x[i:i + 8]) for i in range(0, 64, 8)))

        results = asyncio.run(main())
    expected = engine.predict(x, thresholds=thresholds)
    assert torch.equal(torch.cat([r.exit_index for r in results]), expected.exit_index)
    assert torch.equal(torch.cat([r.prediction for r in results]), expected.prediction)


def quota_oracle(model, x, conditional):
    """Hand oracle of the server's quota mode when every stage runs once on all the rows that
    reach it: exit k takes floor(r_k * conditional[k]) of the r_k rows reaching it, the most
    confident by exit k's (reference) confidence; the last exit takes the rest."""
    with torch.no_grad():
        logits = model(x)
    confidence = [exit_confidence_reference(z)[0].tolist() for z in logits]
    exit_at, remaining = [None] * x.shape[0], list(range(x.shape[0]))
    for k, fraction in enumerate(conditional):
        take = len(remaining) if k == len(conditional) - 1 else math.floor(len(remaining) * fraction + 1e-9)
        leaving = sorted(remaining, key=lambda i: -confidence[k][i])[:take]
        for i in leaving:
            exit_at[i] = k
        remaining = [i for i in remaining if exit_at[i] is None]
    prediction = [int(logits[e][i].argmax()) for i, e in enumerate(exit_at)]
    return torch.tensor(exit_at), torch.tensor(prediction)


def test_quota_against_a_hand_oracle():
    """quota [0.5, 0.25, 0.125, 0.125] on 64 rows is the conditional fraction 1/2 of the rows
    reaching each of the first three exits: 32, 16, 8, then 8 at the last exit, the most
    confident rows of each stage run. submit_many queues all 64 rows at once, so stage 0 runs
    once on all of them and each deeper stage once on all its survivors (nothing arrives
    during max_wait_s)."""
    model = small_mlp(seed=16)
    engine, x = EarlyExitEngine(model), inputs(64, seed=17)
    with EarlyExitServer(engine, quota=[0.5, 0.25, 0.125, 0.125], max_batch_size=64, max_wait_s=0.2) as server:
        results = [f.result(timeout=60) for f in server.submit_many(list(torch.split(x, 8)))]
        stats = server.stats()
    exits = torch.cat([r.exit_index for r in results])
    assert stats.stage_runs == (1, 1, 1, 1)
    assert torch.bincount(exits, minlength=K).tolist() == [32, 16, 8, 8]
    expected_exits, expected_prediction = quota_oracle(model, x, [0.5, 0.5, 0.5, 1.0])
    assert torch.equal(exits, expected_exits)
    assert torch.equal(torch.cat([r.prediction for r in results]), expected_prediction)


def test_constructor_errors():
    engine = EarlyExitEngine(small_mlp())
    with pytest.raises(TypeError, match="engine"):
        EarlyExitServer(object())
    with pytest.raises(ValueError, match="max_batch_size"):
        EarlyExitServer(engine, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        EarlyExitServer(engine, max_wait_s=-1.0)
    with pytest.raises(ValueError, match="thresholds and quota"):
        EarlyExitServer(engine, thresholds=[0.5] * K, quota=[0.25] * K)


def test_stats_as_dict_is_json_ready():
    import json

    engine = EarlyExitEngine(small_mlp())
    with EarlyExitServer(engine) as server:
        before = server.stats().as_dict()
        server.submit(inputs(5)).result(timeout=60)
        after = server.stats().as_dict()
    assert before["latency_p50_s"] is None and after["requests_completed"] == 1
    assert json.loads(json.dumps(after)) == after  # JSON-ready: survives a round trip unchanged
    expected = engine.predict(inputs(5))
    assert after["rows_per_exit"] == list(expected.stats.samples_per_exit) == [0, 0, 0, 5]
    assert after["mean_flops"] == pytest.approx(expected.stats.mean_flops)
    assert after["full_flops"] == pytest.approx(expected.stats.full_flops)
    assert after["latency_p50_s"] == after["latency_p99_s"] > 0  # one request: every percentile is it


def conv_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Conv2d(3 if k == 0 else 8, 8, 3, padding=1), nn.ReLU()) for k in range(3)]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)) for _ in range(3)]
    return MultiExitNetwork(stages, heads, num_classes=5)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_requests_get_predicts_answers(device):
    from ann_kernels.inference.rows import gather_rows

    model = conv_net(seed=30).to(device)
    x = torch.randn(40, 3, 6, 6, generator=torch.Generator().manual_seed(31)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    engine = EarlyExitEngine(model)
    with torch.no_grad():
        conf = torch.stack([torch.softmax(z, 1).max(1).values for z in model(x)]).cpu()
    thresholds = safe_thresholds(conf, 0.5)
    expected = engine.predict(x, thresholds=thresholds)
    with EarlyExitServer(engine, thresholds=thresholds, max_batch_size=16, max_wait_s=0.001) as server:
        futures = [server.submit(x[i:i + 4], deadline_s=None if i % 8 else 30.0) for i in range(0, 40, 4)]
        results = [f.result(timeout=60) for f in futures]
    assert torch.equal(torch.cat([r.exit_index for r in results]), expected.exit_index)
    assert torch.equal(torch.cat([r.prediction for r in results]), expected.prediction)
    rows = torch.tensor([5, 1, 3], device=device)
    gathered = gather_rows(x, rows)  # the layout the masking and deadline paths keep
    assert gathered.is_contiguous(memory_format=torch.channels_last) and torch.equal(gathered, x[[5, 1, 3]])


def test_stage_listeners_queue_times_and_live_counts(caplog):
    """The observation hooks: every stage run reaches the listeners with the rows it ran and
    the rows that got their answer there (they add up to stats()); a raising listener is
    logged once and serving goes on; queue_s is submit -> first stage start; queued_rows()
    and in_flight() count what waits."""
    model = small_mlp(seed=40)
    engine, x = EarlyExitEngine(model), inputs(90, seed=41)
    thresholds = thresholds_for(model, x)
    expected = engine.predict(x, thresholds=thresholds)
    calls = []

    def broken(*args):
        raise ZeroDivisionError("listener bug")

    server = EarlyExitServer(engine, thresholds=thresholds, max_batch_size=1024, max_wait_s=30.0).start()
    server.add_stage_listener(lambda *args: calls.append(args))
    server.add_stage_listener(broken)
    with pytest.raises(TypeError, match="fn"):
        server.add_stage_listener("not callable")
    futures = [server.submit(x[i:i + 3]) for i in range(0, 90, 3)]
    # max_wait_s = 30 s and 1024-row batches: nothing can run before close() drains.
    assert server.queued_rows() == 90 and server.in_flight() == 30
    time.sleep(0.05)
    with caplog.at_level("ERROR", logger="ann_kernels.inference.server"):
        server.close()
    results = [f.result(timeout=0) for f in futures]
    assert server.queued_rows() == 0 and server.in_flight() == 0
    assert torch.equal(torch.cat([r.exit_index for r in results]), expected.exit_index)
    for r in results:  # queued from its submit until close(): at least the 50 ms slept, at most its latency
        assert isinstance(r, EarlyExitResult) and 0.05 <= r.queue_s <= r.stats.total_seconds
    stats = server.stats()
    assert [sum(1 for c in calls if c[0] == k) for k in range(K)] == list(stats.stage_runs)
    for k in range(K):
        rows = sum(c[1] for c in calls if c[0] == k)
        assert rows == pytest.approx(stats.mean_batch_rows[k] * stats.stage_runs[k])
        assert sum(c[2] for c in calls if c[0] == k) == expected.stats.samples_per_exit[k]
    assert all(c[3] >= 0 for c in calls) and calls[0][:2] == (0, 90)
    logged = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info[0] is ZeroDivisionError


def test_submit_many_equals_submit_per_request_in_order():
    """The vectorised intake: one future per batch, in order, each answered as submit() answers
    that batch (and as predict() answers its rows); bad batches fail only their own future."""
    model = small_mlp(seed=42)
    engine, x = EarlyExitEngine(model), inputs(240, seed=43)
    thresholds = thresholds_for(model, x)
    sizes = request_sizes(240, seed=44)
    batches = list(torch.split(x, sizes))
    bad = {3: (torch.randn(2, 17), ValueError, r"x: expected samples of shape \[16\]"),
           7: (x[:2].double(), TypeError, "x: expected dtype torch.float32"),
           11: (x[:0], ValueError, "x: expected a non-empty batch"),
           13: (x[0, 0], ValueError, "x: expected a non-empty batch"),
           15: (x[:2].tolist(), TypeError, "x: expected a tensor")}
    mixed = list(batches)
    for i, (b, _, _) in sorted(bad.items()):
        mixed.insert(i, b)
    with EarlyExitServer(engine, thresholds=thresholds, max_batch_size=32, max_wait_s=0.001) as server:
        one_by_one = [f.result(timeout=60) for f in [server.submit(b) for b in batches]]
        futures = server.submit_many(mixed)
        assert len(futures) == len(mixed)
        for i, (_, kind, message) in bad.items():
            with pytest.raises(kind, match=message):
                futures[i].result(timeout=60)
        good = [f.result(timeout=60) for i, f in enumerate(futures) if i not in bad]
        with pytest.raises(ValueError, match="deadline_s"):
            server.submit_many(batches[:2], deadline_s=-1.0)[1].result(timeout=60)
        assert server.submit_many([]) == []
    assert [r.prediction.shape[0] for r in good] == sizes
    for got, alone, b in zip(good, one_by_one, batches):
        expected = engine.predict(b, thresholds=thresholds)
        for result in (got, alone):
            assert torch.equal(result.prediction, expected.prediction)
            assert torch.equal(result.exit_index, expected.exit_index)
            assert torch.allclose(result.confidence, expected.confidence, atol=1e-5)
            assert result.stats.samples_per_exit == expected.stats.samples_per_exit
            assert result.stats.mean_flops == pytest.approx(expected.stats.mean_flops)
            assert result.stats.executed_flops == pytest.approx(
                sum(c * f for c, f in zip(expected.stats.samples_per_exit, executed_per_exit(engine, b, thresholds)))
                / b.shape[0])
    with pytest.raises(RuntimeError, match="closed"):
        server.submit_many(batches[:1])


def executed_per_exit(engine, x, thresholds) -> list[float]:
    """Hand oracle of the executed FLOPs of a row leaving at exit e: stages 0..e, head e, and
    the heads of the exits before it that were evaluated (threshold not +inf)."""
    stage, head = engine.model.stage_flops(x[:1]).tolist(), engine.model.head_flops(x[:1]).tolist()
    return [sum(stage[:e + 1]) + head[e] + sum(h for h, t in zip(head[:e], thresholds) if t != INF)
            for e in range(len(stage))]


def test_submit_many_a_failing_stage_fails_only_the_requests_of_its_run():
    base = small_mlp(seed=8)
    model = MultiExitNetwork([Poisoned(base.stages[0])] + list(base.stages[1:]), list(base.heads), num_classes=5)
    engine, x = EarlyExitEngine(model), inputs(40, seed=9)
    expected = engine.predict(x, thresholds=[INF] * K)
    batches = [x[i:i + 2] for i in range(0, 40, 2)]
    poisoned = x[:2].clone()
    poisoned[1, 0] = 1e4
    with EarlyExitServer(engine, thresholds=[INF] * K, max_batch_size=4, max_wait_s=0.5) as server:
        futures = server.submit_many(batches[:5] + [poisoned] + batches[5:])
        outcomes = [f.exception(timeout=60) for f in futures]
    # Runs of 4 rows = 2 requests: the poisoned request and the one sharing its run fail.
    assert [i for i, e in enumerate(outcomes) if e is not None] == [4, 5]
    assert "poisoned row" in str(outcomes[5])
    answered = [f.result() for i, f in enumerate(futures) if i not in (4, 5)]
    kept = [b for i, b in enumerate(batches) if i != 4]
    assert torch.equal(torch.cat([r.prediction for r in answered]), torch.cat([engine.predict(b).prediction for b in kept]))
    assert torch.equal(torch.cat([r.prediction for r in answered]),
                       torch.cat([expected.prediction[2 * i:2 * i + 2] for i in range(20) if i != 4]))


def test_burst_futures_share_a_condition_and_behave_as_futures():
    """submit_many's futures share one condition: resolving one wakes a thread waiting on
    another, which must keep waiting (not report a timeout early, not return another's
    result); the rest is the standard Future (cancel, callbacks, wait, asyncio)."""
    from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait

    from ann_kernels.inference.server_state import BurstFuture

    condition = threading.Condition()
    first, second, third = (BurstFuture(condition) for _ in range(3))
    # Future.__init__'s fields (guards a Python change); the callback list is made on first use
    assert set(vars(first)) | {"_done_callbacks"} == set(vars(Future()))
    got = {}

    def waiter():
        got["second"] = second.result(timeout=30)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert second.set_running_or_notify_cancel()
    first.set_result("first")  # wakes the waiter, whose own future is not done: it waits on
    time.sleep(0.05)
    assert thread.is_alive() and "second" not in got
    second.set_result("second")
    thread.join(30)
    assert got == {"second": "second"}
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        third.result(timeout=0.05)
    assert time.perf_counter() - start >= 0.05
    called = []
    third.add_done_callback(lambda f: called.append(f.exception()))
    assert wait([first, third], return_when=FIRST_COMPLETED).done == {first}
    third.set_exception(ValueError("x: bad"))
    assert isinstance(called[0], ValueError) and isinstance(third.exception(timeout=1), ValueError)
    with pytest.raises(ValueError, match="x: bad"):
        third.result(timeout=1)
    cancelled = BurstFuture(condition)
    assert cancelled.cancel() and cancelled.cancelled()
    with pytest.raises(CancelledError):
        cancelled.result(timeout=1)
    running = BurstFuture(condition)
    assert running.set_running_or_notify_cancel() and not running.cancel()

    async def via_asyncio():
        future = BurstFuture(condition)
        future.set_running_or_notify_cancel()
        threading.Timer(0.01, future.set_result, ("async",)).start()
        return await asyncio.wrap_future(future)

    assert asyncio.run(via_asyncio()) == "async"


def test_set_results_resolves_bursts_as_set_result_would(caplog):
    """server_state.set_results (how the worker answers): futures of two bursts in one call;
    threads in result(), concurrent.futures.wait and as_completed are woken with the right
    results; done callbacks run in order after the lock (a raising one is logged, the next
    still runs); a future already done is refused, its result kept."""
    from concurrent.futures import ALL_COMPLETED, as_completed, wait

    from ann_kernels.inference.server_state import BurstFuture, set_results

    first_burst, second_burst = threading.Condition(), threading.Condition()
    futures = [BurstFuture(first_burst, True) for _ in range(3)] + [BurstFuture(second_burst, True) for _ in range(2)]
    assert all(f.running() and not f.done() and not f.cancel() for f in futures)
    calls = []
    futures[0].add_done_callback(lambda f: calls.append(("a", f.result(timeout=0))))
    futures[0].add_done_callback(lambda f: 1 / 0)
    futures[0].add_done_callback(lambda f: calls.append(("c", f.result(timeout=0))))
    futures[4].add_done_callback(lambda f: calls.append(("d", f.result(timeout=0))))
    got = {}

    def in_result(i):
        got[f"result{i}"] = futures[i].result(timeout=60)  # woken by the notify, long before that

    def in_wait():
        got["wait"] = wait(futures, timeout=60, return_when=ALL_COMPLETED)

    def in_as_completed():
        got["as_completed"] = sorted(f.result(timeout=0) for f in as_completed(futures[1:4], timeout=60))

    threads = [threading.Thread(target=in_result, args=(2,)), threading.Thread(target=in_result, args=(3,)),
               threading.Thread(target=in_wait), threading.Thread(target=in_as_completed)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)  # all four are waiting
    with caplog.at_level("ERROR", logger="concurrent.futures"):
        set_results(futures, ["r0", "r1", "r2", "r3", "r4"])
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "a waiter was not woken"
    assert got["result2"] == "r2" and got["result3"] == "r3"
    assert len(got["wait"].done) == 5 and not got["wait"].not_done
    assert got["as_completed"] == ["r1", "r2", "r3"]
    assert calls == [("a", "r0"), ("c", "r0"), ("d", "r4")]
    assert "ZeroDivisionError" in caplog.text
    assert [f.result(timeout=0) for f in futures] == ["r0", "r1", "r2", "r3", "r4"]
    late = []
    futures[1].add_done_callback(late.append)  # done: called at once
    assert late == [futures[1]]
    with pytest.raises(RuntimeError, match="already done"):
        set_results(futures[:1], ["again"])
    assert futures[0].result(timeout=0) == "r0"
