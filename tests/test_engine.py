"""EarlyExitEngine: invariants (+inf = full depth, -inf = exit 0, per-sample decisions equal
a full-network simulation), tuple hidden states, quota, deadline, budget, stream == predict,
threads, bad input."""

from __future__ import annotations

import itertools
import math
import threading
import time

import pytest
import torch
from torch import nn

from ann_kernels import EarlyExitEngine
from ann_kernels.inference import engine as engine_module
from ann_kernels.inference.stage_timing import StageTimes
from ann_kernels.nn import MultiExitNetwork, mlp_ann
from ann_kernels.ops.early_exit import early_exit_step_reference, exit_confidence_reference
from tests.utils import requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]
INF = math.inf
K = 4


def small_mlp(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    return mlp_ann(in_features=16, hidden=32, num_exits=K, num_classes=5)


class TwoScale(nn.Module):
    """A stage with a tuple hidden state (two tensors of different trailing shapes)."""

    def __init__(self, first: bool):
        super().__init__()
        self.first = first
        self.a = nn.Linear(16 if first else 8, 8)
        self.b = nn.Conv2d(1 if first else 2, 2, 3, padding=1)

    def forward(self, h):
        if self.first:
            return torch.relu(self.a(h)), torch.relu(self.b(h[:, :9].reshape(-1, 1, 3, 3)))
        a, b = h
        return torch.relu(self.a(a)), torch.relu(self.b(b))


class TwoScaleHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8 + 18, 5)

    def forward(self, h):
        a, b = h
        return self.linear(torch.cat([a, b.flatten(1)], dim=1))


def tuple_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    return MultiExitNetwork(
        [TwoScale(k == 0) for k in range(3)], [TwoScaleHead() for _ in range(3)], num_classes=5
    )


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def simulate(model, x, thresholds, criterion="max_prob"):
    """Oracle: run the whole network, then take for each sample the first exit whose
    (reference) confidence reaches its threshold; the last exit always accepts."""
    with torch.no_grad():
        logits = model(x)
    conf = torch.stack([exit_confidence_reference(z, criterion)[0] for z in logits])
    passes = conf >= torch.tensor(thresholds, dtype=torch.float32).unsqueeze(1)
    passes[-1] = True
    exit_at = passes.to(torch.int8).argmax(dim=0)
    preds = torch.stack([z.argmax(dim=1) for z in logits])
    rows = torch.arange(x.shape[0])
    return preds[exit_at, rows], exit_at, conf[exit_at, rows], conf


def safe_thresholds(conf: torch.Tensor, quantile: float, gap: float = 1e-4) -> list[float]:
    """Per exit, a threshold near the quantile lying in a gap between observed confidences."""
    out = []
    for row in conf:
        values = torch.unique(row.double()).tolist()
        mids = [(a + b) / 2 for a, b in itertools.pairwise(values) if b - a > gap] or [values[-1] + gap]
        target = float(torch.quantile(row.double(), quantile))
        out.append(min(mids, key=lambda t: abs(t - target)))
    return out


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
    model, x = small_mlp(seed=5), inputs(100, seed=6)
    quota = [0.25, 0.3, 0.0, 0.2]
    result = EarlyExitEngine(model).predict(x, quota=quota)
    # floor(N * cumulative) - already exited: 25, 30, 0, then the last exit takes the rest.
    assert result.stats.samples_per_exit == (25, 30, 0, 45)
    with torch.no_grad():
        conf0 = exit_confidence_reference(model(x)[0])[0]
    left_first = result.exit_index == 0
    assert float(conf0[left_first].min()) >= float(conf0[~left_first].max()) - 1e-6


def test_quota_errors():
    engine, x = EarlyExitEngine(small_mlp()), inputs(10)
    with pytest.raises(ValueError, match="quota.*sum to at most 1"):
        engine.predict(x, quota=[0.5, 0.4, 0.2, 0.0])
    with pytest.raises(ValueError, match="quota"):
        engine.predict(x, quota=[0.5, 0.5])
    with pytest.raises(ValueError, match="quota"):
        engine.predict(x, quota=[-0.1, 0.5, 0.1, 0.1])


class SlowStage(nn.Module):
    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, h):
        time.sleep(self.seconds)
        return self.inner(h)


def test_deadline_zero_returns_exit_zero_predictions():
    model, x = small_mlp(), inputs(40)
    result = EarlyExitEngine(model).predict(x, thresholds=[INF] * K, deadline_s=0)
    with torch.no_grad():
        first = model(x)[0]
    assert (result.exit_index == 0).all() and torch.equal(result.prediction, first.argmax(dim=1))
    assert result.stats.deadline_exit == 0


def test_deadline_mid_network_returns_latest_predictions():
    base = small_mlp(seed=7)
    stages = list(base.stages)
    stages[1] = SlowStage(stages[1], 0.05)
    model = MultiExitNetwork(stages, list(base.heads), num_classes=5)
    x = inputs(30)
    result = EarlyExitEngine(model).predict(x, deadline_s=0.02)  # passes during stage 1
    with torch.no_grad():
        first = model(x)[0]
    # Exit 1 finished late: everyone takes exit 0, the latest finished in time.
    assert (result.exit_index == 0).all() and torch.equal(result.prediction, first.argmax(dim=1))
    assert result.stats.deadline_exit == 1
    relaxed = EarlyExitEngine(model).predict(x, deadline_s=60.0)
    assert (relaxed.exit_index == K - 1).all() and relaxed.stats.deadline_exit is None


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


# ---------------------------------------------------------------- CLI: calibrate / infer


@pytest.fixture
def mlp_checkpoint(tmp_path):
    """A checkpoint in the trainer's format: a small (untrained) MLP ANN on synthetic data."""
    from ann_kernels.train.runs import build_model, make_spec
    from ann_kernels.train.trainer import CHECKPOINT_FORMAT

    spec = make_spec(
        dataset="synthetic",
        model="mlp",
        limit_train=64,
        limit_eval=300,
        model_kwargs={"num_exits": 3, "hidden": 32},
    )
    spec.update(num_classes=10, input_shape=[1, 28, 28])
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28), **spec["model_kwargs"])
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec, "model": model.state_dict(), "epoch": 0}, path)
    return path


def test_cli_calibrate_and_infer(mlp_checkpoint, tmp_path, capsys):
    from ann_kernels import cli

    out = tmp_path / "calib"
    assert (
        cli.main(
            [
                "calibrate",
                "--checkpoint",
                str(mlp_checkpoint),
                "--budgets",
                "0.95",
                "0.99",
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test acc %" in printed and (out / "budgeted.png").stat().st_size > 0
    import json

    saved = json.loads((out / "calibration.json").read_text())
    assert len(saved["budgets"]) == 2
    for row in saved["budgets"]:
        assert row["val_flops"] <= row["budget"] * (1 + 1e-9) and row["thresholds"][-1] == -INF
    assert (
        cli.main(
            [
                "infer",
                "--checkpoint",
                str(mlp_checkpoint),
                "--budget",
                "0.97",
                "--batch-size",
                "64",
                "--threads",
                "1",
                "--warmup",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "early exit : accuracy" in printed and "images/s" in printed and "speedup" in printed
    assert (
        cli.main(
            [
                "infer",
                "--checkpoint",
                str(mlp_checkpoint),
                "--budget",
                "0.97",
                "--stream",
                "--threads",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )


def test_cli_budget_out_of_range_is_a_one_line_error(mlp_checkpoint, capsys):
    from ann_kernels import cli

    assert cli.main(["infer", "--checkpoint", str(mlp_checkpoint), "--budget", "1e15", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and "above the full network" in err


# ---------------------------------------------------------------------------------------
# Deadlines that hold, the masking cost model, the budget cache (issue 12).


class CountingSleep(nn.Module):
    """A stage that sleeps ``seconds`` and counts its calls."""

    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds, self.calls = inner, seconds, 0

    def forward(self, h):
        self.calls += 1
        time.sleep(self.seconds)
        return self.inner(h)


def sleepy_model(stage: int, seconds: float, seed: int = 7) -> tuple[MultiExitNetwork, CountingSleep]:
    base = small_mlp(seed=seed)
    stages = list(base.stages)
    slow = stages[stage] = CountingSleep(stages[stage], seconds)
    return MultiExitNetwork(stages, list(base.heads), num_classes=5), slow


@pytest.mark.parametrize("thresholds", [None, [INF] * K, [0.99, 0.99, 0.99, 0.0]])
def test_deadline_does_not_start_a_stage_measured_to_overrun(thresholds):
    model, slow = sleepy_model(stage=2, seconds=0.2)
    engine, x = EarlyExitEngine(model), inputs(24)
    engine.predict(x, thresholds=thresholds)  # measures every stage (and FLOPs) at this batch size
    calls = slow.calls
    result = engine.predict(x, thresholds=thresholds, deadline_s=0.1)
    assert slow.calls == calls, "the deadline check let the sleeping stage start"
    with torch.no_grad():
        logits = model(x)
    # Rows left before stage 2 take exit 1, the latest reached in time (head 1 is evaluated
    # for them even where a +inf threshold skipped it).
    full = engine.predict(x, thresholds=thresholds)
    late = full.exit_index >= 2
    assert (result.exit_index[late] == 1).all()
    assert torch.equal(result.prediction[late], logits[1].argmax(dim=1)[late])
    assert torch.equal(result.exit_index[~late], full.exit_index[~late])
    assert torch.equal(result.prediction[~late], full.prediction[~late])
    assert result.stats.deadline_exit == (2 if late.any() else None)
    assert result.stats.samples_per_exit[2:] == (0, 0)
    assert result.stats.total_seconds < 0.2  # did not sleep (a structural bound, not a timing one)


def test_deadline_unmeasured_stage_overrunning_then_measured():
    model, slow = sleepy_model(stage=2, seconds=0.1)
    engine, x = EarlyExitEngine(model), inputs(16)
    engine.exit_flops(x)  # FLOP counting runs the stages once
    engine.predict(x[:1], thresholds=[INF] * K)  # stages 0 and 1 measured, at another size
    calls = slow.calls
    with torch.no_grad():
        second = model(x)[1].argmax(dim=1)
    result = engine.predict(x, deadline_s=0.05)  # stage 2 not measured: it runs and overruns
    assert slow.calls == calls + 1 and result.stats.deadline_exit == 2
    assert (result.exit_index == 1).all() and torch.equal(result.prediction, second)
    # Measured now: the next call does not start stage 2 at all, with the same answer.
    again = engine.predict(x, deadline_s=0.05)
    assert slow.calls == calls + 1 and again.stats.deadline_exit == 2
    assert (again.exit_index == 1).all() and torch.equal(again.prediction, second)


def test_stage_times_interpolate_and_extrapolate_conservatively():
    times = StageTimes(2)
    assert times.estimate(0, 10) is None
    times.record(0, 8, 0.008)
    times.record(0, 64, 0.016)
    assert times.estimate(0, 8) == pytest.approx(0.008)
    assert times.estimate(0, 36) == pytest.approx(0.012)  # halfway between the two points
    assert times.estimate(0, 128) == pytest.approx(0.032)  # above: proportional
    assert times.estimate(0, 2) == pytest.approx(0.008)  # below: not cheaper than the smallest
    assert times.measured(0, 15) and not times.measured(0, 16)
    assert times.estimate(1, 8) is None
    times.record(1, 8, 0.001, head=False)
    assert times.estimate(1, 8, head=True) == pytest.approx(0.001)  # the other setting as fallback


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


@pytest.mark.parametrize("thresholds", [None, [0.99] * 3 + [0.0]])
def test_eann_deadlines_follow_the_same_rule(thresholds):
    """EANNEngine and EANN.anytime_predict: a segment measured to overrun is not started."""
    from ann_kernels import EANN, EANNEngine

    first = small_mlp(seed=50)
    second, slow = sleepy_model(stage=0, seconds=0.2, seed=51)  # member 1's first stage sleeps
    members = [
        MultiExitNetwork(list(first.stages[:2]), list(first.heads[:2]), num_classes=5),
        MultiExitNetwork(list(second.stages[:2]), list(second.heads[:2]), num_classes=5),
    ]
    model = EANN(members).eval()
    engine, x = EANNEngine(model), inputs(12)
    model.exit_flops(x)
    with torch.no_grad():
        exit1 = model(x)[1].argmax(dim=1)
    engine.predict(x, thresholds=thresholds)  # measures every segment
    calls = slow.calls
    full = engine.predict(x, thresholds=thresholds)
    calls_full = slow.calls - calls
    result = engine.predict(x, thresholds=thresholds, deadline_s=0.1)
    assert slow.calls == calls + calls_full, "a segment measured at 0.2 s started under a 0.1 s deadline"
    late = full.exit_index >= 2
    assert late.any()
    assert (result.exit_index[late] == 1).all() and torch.equal(result.prediction[late], exit1[late])
    assert torch.equal(result.exit_index[~late], full.exit_index[~late])
    assert result.stats.deadline_exit == 2
    anytime = model.anytime_predict(x, deadline_s=0.1)  # its segments: measured by the same table
    assert slow.calls == calls + calls_full
    assert anytime.exit_index == 1 and anytime.deadline_met and torch.equal(anytime.prediction, exit1)


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
