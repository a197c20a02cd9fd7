"""EarlyExitEngine: invariants (+inf = full depth, -inf = exit 0, per-sample decisions equal
a full-network simulation), tuple hidden states, quota, budget, threads, bad input, the
masking cost model and the budget cache. Deadlines: tests/test_engine_deadlines.py; the
stream: tests/test_stream.py; the CLI: tests/test_engine_cli.py."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import engine as engine_module
from ann_kernels.inference.stage_timing import StageTimes
from ann_kernels.ops.early_exit import early_exit_step_reference, exit_confidence_reference
from tests.early_exit_helpers import INF, K, inputs, safe_thresholds, simulate, small_mlp, tuple_net
from tests.utils import requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]


def test_infinite_thresholds_give_full_depth_exactly():
    model, x = small_mlp(), inputs(100)
    result = EarlyExitEngine(model).predict(x, thresholds=[INF] * K)
    with torch.no_grad():
        last = model(x)[-1]
    assert torch.equal(result.prediction, last.argmax(dim=1))
    assert (result.exit_index == K - 1).all()
    assert result.stats.samples_per_exit == (0,) * (K - 1) + (100,)
    assert result.stats.mean_flops == pytest.approx(result.stats.full_flops)
    assert torch.allclose(result.confidence, exit_confidence_reference(last)[0], atol=2e-6)


def test_minus_inf_thresholds_exit_everyone_at_the_first_exit():
    model, x = small_mlp(), inputs(50)
    result = EarlyExitEngine(model).predict(x, thresholds=[-INF] * K)
    with torch.no_grad():
        first = model(x)[0]
    assert (result.exit_index == 0).all() and torch.equal(result.prediction, first.argmax(dim=1))
    assert result.stats.samples_per_exit == (50,) + (0,) * (K - 1)
    assert result.stats.stage_seconds[1:] == (0.0,) * (K - 1)


@pytest.mark.parametrize("criterion", ["max_prob", "entropy", "margin"])
@pytest.mark.parametrize("quantile", [0.2, 0.6, 0.9])
def test_decisions_equal_full_network_simulation(criterion, quantile):
    model, x = small_mlp(seed=2), inputs(300, seed=3)
    _, _, _, conf = simulate(model, x, [0.0] * K, criterion)
    thresholds = safe_thresholds(conf, quantile)
    result = EarlyExitEngine(model, criterion=criterion).predict(x, thresholds=thresholds)
    prediction, exit_at, confidence, _ = simulate(model, x, thresholds, criterion)
    assert torch.equal(result.exit_index, exit_at)
    assert torch.equal(result.prediction, prediction)
    assert torch.allclose(result.confidence, confidence, atol=1e-5)
    counts = torch.bincount(exit_at, minlength=K).tolist()
    assert list(result.stats.samples_per_exit) == counts
    flops = EarlyExitEngine(model).exit_flops(x)
    assert result.stats.mean_flops == pytest.approx(float((flops[exit_at]).mean()))
    assert result.stats.executed_flops >= result.stats.mean_flops


def test_tuple_hidden_state():
    model, x = tuple_net(), inputs(120, seed=4)
    _, _, _, conf = simulate(model, x, [0.0] * 3)
    thresholds = safe_thresholds(conf, 0.5)
    result = EarlyExitEngine(model).predict(x, thresholds=thresholds)
    prediction, exit_at, _, _ = simulate(model, x, thresholds)
    assert torch.equal(result.exit_index, exit_at) and torch.equal(result.prediction, prediction)
    assert 0 < int((exit_at == 0).sum()) < 120, "the test needs samples that continue past exit 0"


def test_quota_takes_the_most_confident_remaining_samples():
    """Hand oracle: quota [0.25, 0.3, 0.0, 0.2] on 100 rows gives floor(N * cumulative) minus
    those already gone: 25 at exit 0 (the most confident by exit 0's confidence), then the 30
    most confident of the 75 left by exit 1's, none at exit 2, the 45 left at the last exit;
    each row's prediction is its exit's argmax."""
    model, x = small_mlp(seed=5), inputs(100, seed=6)
    quota = [0.25, 0.3, 0.0, 0.2]
    result = EarlyExitEngine(model).predict(x, quota=quota)
    assert result.stats.samples_per_exit == (25, 30, 0, 45)
    with torch.no_grad():
        logits = model(x)
    confidence = [exit_confidence_reference(z)[0].tolist() for z in logits]
    expected, remaining = [None] * 100, list(range(100))
    for k, take in enumerate((25, 30, 0, 45)):
        for i in sorted(remaining, key=lambda i: -confidence[k][i])[:take]:
            expected[i] = k
        remaining = [i for i in remaining if expected[i] is None]
    assert result.exit_index.tolist() == expected
    assert result.prediction.tolist() == [int(logits[e][i].argmax()) for i, e in enumerate(expected)]
    assert torch.allclose(result.confidence, torch.tensor([confidence[e][i] for i, e in enumerate(expected)]),
                          atol=1e-6)


def test_quota_errors():
    engine, x = EarlyExitEngine(small_mlp()), inputs(10)
    with pytest.raises(ValueError, match="quota.*sum to at most 1"):
        engine.predict(x, quota=[0.5, 0.4, 0.2, 0.0])
    with pytest.raises(ValueError, match="quota"):
        engine.predict(x, quota=[0.5, 0.5])
    with pytest.raises(ValueError, match="quota"):
        engine.predict(x, quota=[-0.1, 0.5, 0.1, 0.1])


def test_budget_from_calibration():
    model = small_mlp(seed=8)
    engine = EarlyExitEngine(model)
    with pytest.raises(RuntimeError, match="calibrate"):
        engine.predict(inputs(10), budget=1e5)
    val_x = inputs(400, seed=9)
    with torch.no_grad():
        val_y = model(val_x)[-1].argmax(dim=1)  # the last exit is "right" by construction
    calibration = engine.calibrate(val_x, val_y, batch_size=128)
    assert calibration.confidence.shape == (K, 400) and calibration.correct.dtype == torch.bool
    flops = calibration.exit_flops
    budget = float(flops[0] + 0.4 * (flops[-1] - flops[0]))
    planned = engine.calibrate_budget(budget)
    result = engine.predict(val_x, budget=budget)
    # Same samples as calibration: the realised cost is the held-out cost (up to boundary
    # samples whose confidence differs in the last bit between batch sizes).
    assert result.stats.mean_flops == pytest.approx(planned.mean_flops, rel=0.02)
    assert result.stats.mean_flops <= budget * 1.02
    with pytest.raises(ValueError, match="budget.*below the cheapest exit"):
        engine.predict(val_x, budget=0.5 * float(flops[0]))
    with pytest.raises(ValueError, match="budget.*above the full network"):
        engine.predict(val_x, budget=2 * float(flops[-1]))
    loader = [(val_x[i : i + 100], val_y[i : i + 100]) for i in range(0, 400, 100)]
    again = engine.calibrate(loader)
    assert torch.equal(again.correct, calibration.correct)
    assert torch.allclose(again.confidence, calibration.confidence, atol=1e-6)


def test_threads_give_serial_results():
    model = small_mlp(seed=14)
    engine = EarlyExitEngine(model)
    xs = [inputs(64 + 8 * i, seed=20 + i) for i in range(6)]
    modes = [
        {"thresholds": [0.45, 0.5, 0.55, 0.0]},
        {"quota": [0.2, 0.2, 0.2, 0.2]},
        {"thresholds": [INF] * K},
    ]
    serial = [[engine.predict(x, **mode) for mode in modes] for x in xs]
    outputs: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            outputs[i] = [[engine.predict(x, **mode) for mode in modes] for x in xs[i:] + xs[:i]]
        except Exception as error:  # noqa: BLE001  (surfaced below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, per_thread in outputs.items():
        for j, got in enumerate(per_thread):
            for a, b in zip(got, serial[(i + j) % len(xs)]):
                assert torch.equal(a.prediction, b.prediction) and torch.equal(a.exit_index, b.exit_index)


def test_reference_fallback_gives_the_same_results(monkeypatch):
    model, x = small_mlp(seed=15), inputs(80)
    thresholds = [0.45, 0.5, 0.55, 0.0]
    fast = EarlyExitEngine(model).predict(x, thresholds=thresholds)
    monkeypatch.setattr(engine_module, "step_function", lambda device_type: early_exit_step_reference)
    slow = EarlyExitEngine(model).predict(x, thresholds=thresholds)
    assert torch.equal(fast.exit_index, slow.exit_index) and torch.equal(fast.prediction, slow.prediction)


def test_bad_inputs_name_the_argument():
    engine, x = EarlyExitEngine(small_mlp()), inputs(8)
    with pytest.raises(TypeError, match="model"):
        EarlyExitEngine(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="criterion"):
        EarlyExitEngine(small_mlp(), criterion="softmax")
    with pytest.raises(ValueError, match="thresholds.*4 values"):
        engine.predict(x, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="thresholds.*NaN"):
        engine.predict(x, thresholds=[0.5, math.nan, 0.5, 0.5])
    with pytest.raises(ValueError, match="x: empty batch"):
        engine.predict(x[:0], thresholds=[INF] * K)
    with pytest.raises(ValueError, match="thresholds and quota"):
        engine.predict(x, thresholds=[INF] * K, quota=[0.25] * K)
    with pytest.raises(ValueError, match="deadline_s"):
        engine.predict(x, deadline_s=-1.0)
    with pytest.raises(TypeError, match="x"):
        engine.predict([1, 2, 3])
    engine.model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        engine.predict(x)


@pytest.mark.parametrize("net", ["mlp", "tuple"])
def test_masking_gives_the_same_results_as_compaction(net):
    model = small_mlp(seed=30) if net == "mlp" else tuple_net(seed=30)
    x = inputs(200, seed=31)
    _, _, _, conf = simulate(model, x, [0.0] * model.num_exits)
    thresholds = safe_thresholds(conf, 0.5)
    compacting = EarlyExitEngine(model)
    compacting.adaptive_masking = False
    expected = compacting.predict(x, thresholds=thresholds)
    masking = EarlyExitEngine(model)
    masking.predict(x, thresholds=thresholds)  # survival rates
    masking.stage_times = StageTimes(model.num_exits)
    for k in range(model.num_exits):  # flat stage times: small batches are not cheaper
        for rows in (1, 2, 4, 8, 16, 32, 64, 128, 200):
            for _ in range(3):
                masking.stage_times.record(k, rows, 1e-3)
    got = masking.predict(x, thresholds=thresholds)
    assert got.stats.executed_flops > expected.stats.executed_flops  # it did run masked rows
    assert torch.equal(got.prediction, expected.prediction)
    assert torch.equal(got.exit_index, expected.exit_index)
    assert torch.equal(got.confidence, expected.confidence)
    assert got.stats.samples_per_exit == expected.stats.samples_per_exit
    masking.stage_times = StageTimes(model.num_exits)
    for k in range(model.num_exits):  # proportional times: compaction pays, back to it
        for rows in (1, 2, 4, 8, 16, 32, 64, 128, 200):
            for _ in range(3):
                masking.stage_times.record(k, rows, 1e-5 * rows)
    again = masking.predict(x, thresholds=thresholds)
    assert again.stats.executed_flops == pytest.approx(expected.stats.executed_flops)
    assert torch.equal(again.prediction, expected.prediction)


def test_budget_cache_is_lru_bounded(monkeypatch):
    monkeypatch.setattr(engine_module, "BUDGET_CACHE_SIZE", 8)
    model = small_mlp(seed=8)
    engine = EarlyExitEngine(model)
    engine.calibrate(inputs(200, seed=9), torch.randint(0, 5, (200,)))
    flops = engine.exit_flops(inputs(1))
    budgets = torch.linspace(float(flops[0]), float(flops[-1]), 20).tolist()
    for b in budgets:
        engine.calibrate_budget(b)
    assert len(engine._budget_cache) == 8
    first = engine.calibrate_budget(budgets[-8])  # a hit, made most recent
    engine.calibrate_budget(budgets[0])  # a miss evicts the least recent (budgets[-7])
    assert first is engine.calibrate_budget(budgets[-8])
    assert (engine._generation, budgets[-7]) not in engine._budget_cache


def test_concurrent_calibrate_never_leaves_stale_thresholds(monkeypatch):
    """A budget computed from calibration A, while calibrate(B) replaces it, must not be
    cached: later calls must see B's thresholds."""
    model = small_mlp(seed=8)
    engine = EarlyExitEngine(model)
    val_a, val_b = inputs(300, seed=40), inputs(300, seed=41)
    y = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(42))
    engine.calibrate(val_a, y)
    budget = float(engine.exit_flops(val_a[:1])[1])
    real = engine_module.calibrate_for_budget
    entered, release = threading.Event(), threading.Event()

    def slow_calibration(*args):
        entered.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(engine_module, "calibrate_for_budget", slow_calibration)
    worker = threading.Thread(target=engine.calibrate_budget, args=(budget,))
    worker.start()
    assert entered.wait(10)
    engine.calibrate(val_b, 1 - y.clamp(max=1))  # other data, other labels
    release.set()
    worker.join(10)
    monkeypatch.setattr(engine_module, "calibrate_for_budget", real)
    fresh = EarlyExitEngine(model)
    fresh.calibrate(val_b, 1 - y.clamp(max=1))
    assert torch.equal(engine.thresholds_for_budget(budget), fresh.thresholds_for_budget(budget))
