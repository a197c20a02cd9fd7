"""The early-exit op (C++ CPU kernel) against its pure-torch reference: confidences,
decisions, scatter to original positions, compaction, quota mode, opcheck, bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ann_kernels import _ext
from ann_kernels.ops import early_exit as ee
from ann_kernels.ops.early_exit import (
    CRITERIA,
    early_exit_step,
    early_exit_step_reference,
    exit_confidence,
    exit_confidence_reference,
)
from tests.utils import max_abs_err, requires_ext

pytestmark = requires_ext
INF = math.inf
CONF_ATOL = 2e-6


def buffers(n: int):
    """Output buffers [N] pre-filled with sentinels, so untouched positions are visible."""
    return (
        torch.full((n,), -7, dtype=torch.int64),
        torch.full((n,), -9, dtype=torch.int64),
        torch.full((n,), -5.0, dtype=torch.float32),
    )


def safe_threshold(confidence: torch.Tensor, quantile: float, gap: float = 1e-4) -> float:
    """A threshold near the quantile of `confidence` that lies in a gap of at least `gap`
    between observed values, so fp32 rounding differences cannot flip a decision."""
    values = torch.unique(confidence.double()).tolist()
    candidates = [values[0] - 2 * gap] + [(a + b) / 2 for a, b in itertools.pairwise(values) if b - a > gap]
    candidates.append(values[-1] + 2 * gap)
    target = float(torch.quantile(confidence.double(), quantile))
    return min(candidates, key=lambda t: abs(t - target))


def run_both(logits, active, hidden, n, *, threshold=-INF, criterion="max_prob", exit_id=0, exit_count=None):
    """Kernel and reference on the same inputs: ((buffers, ExitStep) of each)."""
    kernel_bufs, ref_bufs = buffers(n), buffers(n)
    kernel = early_exit_step(
        logits,
        active,
        hidden,
        *kernel_bufs,
        threshold=threshold,
        criterion=criterion,
        exit_id=exit_id,
        exit_count=exit_count,
    )
    ref = early_exit_step_reference(
        logits,
        active,
        hidden,
        *ref_bufs,
        threshold,
        CRITERIA[criterion],
        exit_id,
        -1 if exit_count is None else exit_count,
    )
    return (kernel_bufs, kernel), (ref_bufs, ref)


def assert_same(kernel, ref):
    (k_pred, k_exit, k_conf), k_step = kernel
    (r_pred, r_exit, r_conf), r_step = ref
    assert torch.equal(k_exit, r_exit)
    assert torch.equal(k_pred, r_pred)
    assert max_abs_err(k_conf, r_conf) <= CONF_ATOL
    assert torch.equal(k_step.survivor_index, r_step.survivor_index)
    assert torch.equal(k_step.keep_local, r_step.keep_local)
    assert k_step.hidden.shape == r_step.hidden.shape and torch.equal(k_step.hidden, r_step.hidden)


def make_logits(m: int, c: int, *, seed: int = 0, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(m, c, generator=gen)).to(dtype)


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("num_classes", [1, 2, 3, 10, 16, 17, 100, 1000])
@pytest.mark.parametrize("num_rows", [1, 7, 9, 256])
def test_confidence_matches_reference(criterion, num_classes, num_rows):
    logits = make_logits(num_rows, num_classes, seed=num_rows * 7 + num_classes)
    conf, pred = exit_confidence(logits, criterion)
    ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
    assert conf.dtype == torch.float32 and pred.dtype == torch.int64
    assert max_abs_err(conf, ref_conf) <= CONF_ATOL
    assert torch.equal(pred, ref_pred)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_low_precision_logits(dtype, num_classes):
    logits = make_logits(33, num_classes, seed=3, dtype=dtype)
    for criterion in CRITERIA:
        conf, pred = exit_confidence(logits, criterion)
        ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
        assert max_abs_err(conf, ref_conf) <= CONF_ATOL
        assert torch.equal(pred, ref_pred)


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("num_classes", [2, 10, 40])
@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.8, 1.0])
def test_threshold_step_matches_reference(criterion, num_classes, quantile):
    n, m = 300, 200
    gen = torch.Generator().manual_seed(num_classes)
    active = torch.randperm(n, generator=gen)[:m]  # a scattered subset of the batch
    logits = make_logits(m, num_classes, seed=num_classes + 1)
    hidden = torch.randn(m, 3, 4, generator=gen)
    threshold = safe_threshold(exit_confidence_reference(logits, criterion)[0], quantile)
    kernel, ref = run_both(logits, active, hidden, n, threshold=threshold, criterion=criterion, exit_id=4)
    assert_same(kernel, ref)
    (_, exit_buf, _), _step = kernel
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[active] = False
    assert (exit_buf[untouched] == -9).all(), "positions outside active_index must not be written"
    assert set(exit_buf[active].unique().tolist()) <= {4, -9}


@pytest.mark.parametrize("hidden_shape", [None, (), (256,), (3, 5, 5)])
def test_hidden_gather_shapes(hidden_shape):
    m = 50
    logits = make_logits(m, 10, seed=5)
    hidden = None if hidden_shape is None else torch.randn(m, *hidden_shape)
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.5)
    kernel, ref = run_both(logits, torch.arange(m), hidden, m, threshold=threshold)
    assert_same(kernel, ref)
    step = kernel[1]
    if hidden is None:
        assert step.hidden.numel() == 0
    else:
        assert step.hidden.shape == (step.keep_local.shape[0], *hidden_shape)
        assert step.hidden.data_ptr() != hidden.data_ptr()


def test_strided_inputs():
    m, c = 64, 12
    logits = make_logits(c, m, seed=6).t()  # column stride 64
    hidden = torch.randn(8, m).t()  # non-contiguous hidden
    active = torch.arange(2 * m)[::2]  # non-contiguous active_index
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.4)
    kernel, ref = run_both(logits, active, hidden, 2 * m, threshold=threshold, exit_id=1)
    assert_same(kernel, ref)


def test_infinite_thresholds():
    m = 40
    logits = make_logits(m, 10, seed=8)
    hidden = torch.randn(m, 6)
    (pred, exits, conf), step = run_both(logits, torch.arange(m), hidden, m, threshold=INF)[0]
    assert (exits == -9).all() and (pred == -7).all() and (conf == -5.0).all()
    assert torch.equal(step.survivor_index, torch.arange(m)) and torch.equal(step.hidden, hidden)
    assert step.hidden.data_ptr() != hidden.data_ptr(), "must never return the input buffer"
    (pred, exits, conf), step = run_both(logits, torch.arange(m), hidden, m, threshold=-INF, exit_id=2)[0]
    assert (exits == 2).all() and torch.equal(pred, logits.argmax(1))
    assert step.survivor_index.numel() == 0 and step.hidden.shape == (0, 6)


def test_nan_rows_exit_only_at_minus_inf():
    logits = make_logits(9, 10, seed=9)
    logits[3, 4] = math.nan
    conf, pred = exit_confidence(logits, "max_prob")
    assert math.isnan(conf[3]) and int(pred[3]) == 4  # torch.argmax: NaN is the maximum
    (_, exits, _), step = run_both(logits, torch.arange(9), None, 9, threshold=0.0)[0]
    assert int(exits[3]) == -9 and 3 in step.survivor_index.tolist()
    (_, exits, _), _ = run_both(logits, torch.arange(9), None, 9, threshold=-INF)[0]
    assert (exits == 0).all()


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("count", [0, 1, 37, 100, 130])
def test_quota_matches_reference(criterion, count):
    m = 100
    logits = make_logits(m, 10, seed=count + 11)
    active = torch.arange(m) * 3
    kernel, ref = run_both(
        logits, active, torch.randn(m, 2), 3 * m, criterion=criterion, exit_count=count, exit_id=5
    )
    conf = exit_confidence_reference(logits, criterion)[0].sort(descending=True).values
    if 0 < count < m:
        assume_gap = float(conf[count - 1] - conf[count])
        if assume_gap <= 1e-5:
            pytest.skip("boundary confidences too close for an exact set comparison")
    assert_same(kernel, ref)
    assert int((kernel[0][1] == 5).sum()) == min(count, m)


def test_quota_ties_take_row_order():
    logits = torch.zeros(10, 4)  # every confidence equal
    (_, exits, _), step = run_both(logits, torch.arange(10), None, 10, exit_count=3)[0]
    assert exits.tolist() == [0, 0, 0] + [-9] * 7
    assert step.survivor_index.tolist() == list(range(3, 10))


def test_direct_binding_equals_torch_ops():
    from ann_kernels import _C

    m = 64
    logits, hidden = make_logits(m, 10, seed=12), torch.randn(m, 16)
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.5)
    a, b = buffers(m), buffers(m)
    out_ops = torch.ops.ann_kernels.early_exit_step(logits, torch.arange(m), hidden, *a, threshold, 0, 1, -1)
    out_direct = _C.early_exit_step(logits, torch.arange(m), hidden, *b, threshold, 0, 1, -1)
    for x, y in zip(list(a) + list(out_ops), list(b) + list(out_direct)):
        assert torch.equal(x, y)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 40),
    c=st.integers(1, 40),
    criterion=st.sampled_from(list(CRITERIA)),
    quantile=st.floats(0, 1),
    use_quota=st.booleans(),
    count=st.integers(0, 45),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_fuzz_against_reference(m, c, criterion, quantile, use_quota, count, seed, scale):
    logits = make_logits(m, c, seed=seed, scale=scale)
    ref_conf = exit_confidence_reference(logits, criterion)[0]
    n = m + 5
    active = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
    hidden = torch.randn(m, 3)
    if use_quota:
        ordered = ref_conf.sort(descending=True).values
        if 0 < count < m:
            assume(float(ordered[count - 1] - ordered[count]) > 1e-5)
        kernel, ref = run_both(logits, active, hidden, n, criterion=criterion, exit_count=count, exit_id=2)
    else:
        kernel, ref = run_both(
            logits,
            active,
            hidden,
            n,
            criterion=criterion,
            exit_id=2,
            threshold=safe_threshold(ref_conf, quantile),
        )
    assert_same(kernel, ref)


@pytest.mark.parametrize("case", ["threshold", "quota", "no_hidden", "all_exit"])
def test_opcheck(case):
    m, n = 24, 30
    logits = make_logits(m, 10, seed=13)
    hidden = None if case == "no_hidden" else torch.randn(m, 5)
    threshold = {"all_exit": -INF}.get(case, 0.6)
    count = 7 if case == "quota" else -1
    args = (logits, torch.randperm(n)[:m], hidden, *buffers(n), threshold, 0, 3, count)
    torch.library.opcheck(torch.ops.ann_kernels.early_exit_step.default, args)


def test_bad_inputs_name_the_argument():
    m = 8
    logits = make_logits(m, 5)
    good = {"threshold": 0.5}
    with pytest.raises(ValueError, match="active_index"):
        early_exit_step(logits, torch.arange(m - 1), None, *buffers(m), **good)
    with pytest.raises(ValueError, match="active_index"):
        early_exit_step(logits, torch.arange(m).int(), None, *buffers(m), **good)
    with pytest.raises(ValueError, match="threshold"):
        early_exit_step(logits, torch.arange(m), None, *buffers(m), threshold=math.nan)
    with pytest.raises(ValueError, match="criterion"):
        early_exit_step(logits, torch.arange(m), None, *buffers(m), threshold=0.5, criterion="softmax")
    with pytest.raises(ValueError, match="hidden"):
        early_exit_step(logits, torch.arange(m), torch.zeros(m + 1, 2), *buffers(m), **good)
    pred, exits, conf = buffers(m)
    with pytest.raises(ValueError, match="confidence"):
        early_exit_step(logits, torch.arange(m), None, pred, exits, conf.double(), **good)
    with pytest.raises(ValueError, match="exit_count"):
        early_exit_step(logits, torch.arange(m), None, *buffers(m), exit_count=-2)
    with pytest.raises(ValueError, match="logits"):
        early_exit_step(logits[0], torch.arange(m), None, *buffers(m), **good)
    with pytest.raises(RuntimeError, match="out of range"):  # the kernel's own check
        early_exit_step(logits, torch.arange(m) + 100, None, *buffers(m), threshold=-INF)
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.ann_kernels.early_exit_step(logits, torch.arange(m), None, *buffers(m), math.nan, 0, 0, -1)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(ee, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(_ext, "_warned", set())
    logits = make_logits(20, 10, seed=14)
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = early_exit_step(logits, torch.arange(20), None, *buffers(20), threshold=threshold)
        early_exit_step(logits, torch.arange(20), None, *buffers(20), threshold=threshold)
    assert sum("pure-torch reference" in str(w.message) for w in caught) == 1
    monkeypatch.undo()
    second = early_exit_step(logits, torch.arange(20), None, *buffers(20), threshold=threshold)
    assert torch.equal(first.survivor_index, second.survivor_index)
