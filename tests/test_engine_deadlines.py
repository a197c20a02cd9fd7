"""Deadlines of EarlyExitEngine.predict and EANNEngine: exit 0 at deadline 0, the latest exit
finished in time, a stage measured to overrun is never started, and the stage-time table
behind it."""

from __future__ import annotations

import pytest
import torch

from ann_kernels import EarlyExitEngine
from ann_kernels.inference.stage_timing import StageTimes
from ann_kernels.nn import MultiExitNetwork
from tests.early_exit_helpers import INF, K, SlowStage, inputs, sleepy_model, small_mlp
from tests.utils import requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]


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
