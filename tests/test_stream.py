"""EarlyExitEngine.stream: per-stage rebatching gives predict()'s answers (tensor and tuple
hidden states), long runs shift the buffers, bad arguments, max_wait_s, deadlines."""

from __future__ import annotations

import time

import pytest
import torch

from ann_kernels import EarlyExitEngine
from tests.early_exit_helpers import INF, K, inputs, safe_thresholds, simulate, sleepy_model, small_mlp, tuple_net
from tests.utils import requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("net", ["mlp", "tuple"])
def test_stream_equals_predict(net):
    model = small_mlp(seed=10) if net == "mlp" else tuple_net(seed=10)
    x = inputs(157, seed=11)
    engine = EarlyExitEngine(model)
    _, _, _, conf = simulate(model, x, [0.0] * model.num_exits)
    thresholds = safe_thresholds(conf, 0.5)
    expected = engine.predict(x, thresholds=thresholds)
    sizes = [40, 1, 33, 50, 33]
    batches = list(torch.split(x, sizes))
    results = list(engine.stream(iter(batches), thresholds=thresholds, batch_size=16))
    assert [r.prediction.shape[0] for r in results] == sizes
    assert torch.equal(torch.cat([r.prediction for r in results]), expected.prediction)
    assert torch.equal(torch.cat([r.exit_index for r in results]), expected.exit_index)
    assert torch.allclose(torch.cat([r.confidence for r in results]), expected.confidence, atol=1e-6)
    for r in results:
        assert sum(r.stats.samples_per_exit) == r.prediction.shape[0]
    assert not torch.is_inference_mode_enabled()


def test_stream_long_run_shifts_buffers():
    model, engine = small_mlp(seed=12), None
    engine = EarlyExitEngine(model)
    x = inputs(3000, seed=13)
    thresholds = [0.5, 0.5, 0.5, -INF]
    expected = engine.predict(x, thresholds=thresholds)
    results = list(engine.stream(torch.split(x, 100), thresholds=thresholds))
    assert torch.equal(torch.cat([r.exit_index for r in results]), expected.exit_index)
    assert torch.equal(torch.cat([r.prediction for r in results]), expected.prediction)


def test_stream_rejects_quota_and_bad_batches():
    engine = EarlyExitEngine(small_mlp())
    with pytest.raises(ValueError, match="quota"):
        engine.stream([inputs(4)], quota=[0.5, 0.5, 0, 0])
    with pytest.raises(ValueError, match="deadline_s"):
        engine.stream([inputs(4)], deadline_s=-1.0)
    with pytest.raises(ValueError, match="batches: batch 1"):
        list(engine.stream([inputs(4), inputs(0)], thresholds=[INF] * K))


def test_stream_max_wait_bounds_the_wait_for_a_full_batch():
    model = small_mlp(seed=12)
    engine = EarlyExitEngine(model)
    thresholds = [INF, INF, INF, -INF]
    x = inputs(8, seed=13)
    produced = []

    def batches():
        for i in range(4):
            produced.append(i)
            yield x[i : i + 1]
            time.sleep(0.02)

    gen = engine.stream(batches(), thresholds=thresholds, batch_size=64, max_wait_s=0.01)
    first = next(gen)
    # Without max_wait_s the 64-row batches would wait for the end of the stream.
    assert len(produced) < 4 and first.prediction.shape == (1,)
    rest = list(gen)
    expected = engine.predict(x[:4], thresholds=thresholds)
    assert torch.equal(torch.cat([first.prediction] + [r.prediction for r in rest]), expected.prediction)
    with pytest.raises(ValueError, match="max_wait_s"):
        engine.stream([x], max_wait_s=-1)


def test_stream_deadline_does_not_start_a_stage_measured_to_overrun():
    model, slow = sleepy_model(stage=2, seconds=0.2)
    engine, x = EarlyExitEngine(model), inputs(24, seed=60)
    engine.predict(x, thresholds=[INF] * K)  # measures every stage at this batch size
    calls = slow.calls
    with torch.no_grad():
        exit1 = model(x)[1].argmax(dim=1)
    slow.calls = calls
    results = list(engine.stream(torch.split(x, 8), thresholds=[INF] * K, batch_size=24, deadline_s=0.1))
    assert slow.calls == calls, "the stream started a stage measured at 0.2 s for a 0.1 s deadline"
    assert torch.equal(torch.cat([r.exit_index for r in results]), torch.ones(24, dtype=torch.int64))
    assert torch.equal(torch.cat([r.prediction for r in results]), exit1)
    relaxed = list(engine.stream(torch.split(x, 8), thresholds=[INF] * K, batch_size=24, deadline_s=30.0))
    assert (torch.cat([r.exit_index for r in relaxed]) == K - 1).all()


def test_stream_deadline_passing_during_a_stage_takes_the_exit_before():
    model, slow = sleepy_model(stage=2, seconds=0.1)
    engine, x = EarlyExitEngine(model), inputs(16, seed=61)
    engine.exit_flops(x)  # FLOP counting runs the stages once
    with torch.no_grad():
        exit1 = model(x)[1].argmax(dim=1)
    calls = slow.calls
    results = list(engine.stream([x], thresholds=[INF] * K, deadline_s=0.05))  # stage 2 not measured yet
    assert slow.calls == calls + 1
    assert (results[0].exit_index == 1).all() and torch.equal(results[0].prediction, exit1)
