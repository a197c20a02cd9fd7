"""The early-exit op (C++ CPU kernel; CUDA kernel where there is a GPU) against its pure-torch
reference: confidences, decisions, scatter to original positions, compaction, quota mode,
the non-finite-logits rule, hidden-state layouts, opcheck, bad input.

Device-parametrised (``device`` fixture, tests/conftest.py): on CUDA every case is checked
against the reference on CPU copies and against the CPU kernel (decisions bit-exact: the
thresholds sit in gaps between confidences, so fp32 rounding cannot flip a decision).
GPU-only big cases live in tests/test_early_exit_cuda.py."""

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
from tests.utils import max_abs_err, requires_cuda, requires_ext

pytestmark = requires_ext
INF = math.inf
NAN = math.nan
CONF_ATOL = 2e-6


def buffers(n: int, device="cpu"):
    """Output buffers [N] pre-filled with sentinels, so untouched positions are visible."""
    return (
        torch.full((n,), -7, dtype=torch.int64, device=device),
        torch.full((n,), -9, dtype=torch.int64, device=device),
        torch.full((n,), -5.0, dtype=torch.float32, device=device),
    )


def cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def safe_threshold(confidence: torch.Tensor, quantile: float, gap: float = 1e-4) -> float:
    """A threshold near the quantile of `confidence` that lies in a gap of at least `gap`
    between observed values, so fp32 rounding differences cannot flip a decision."""
    values = torch.unique(confidence.double()).tolist()
    candidates = [values[0] - 2 * gap] + [(a + b) / 2 for a, b in itertools.pairwise(values) if b - a > gap]
    candidates.append(values[-1] + 2 * gap)
    target = float(torch.quantile(confidence.double(), quantile))
    return min(candidates, key=lambda t: abs(t - target))


def _call_kernel(logits, active, hidden, n, device, **kwargs):
    bufs = buffers(n, device)
    to = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    step = early_exit_step(to(logits), to(active), to(hidden), *bufs, **kwargs)
    return tuple(b.cpu() for b in bufs), ee.ExitStep(*(t.cpu() for t in step))


def run_both(logits, active, hidden, n, *, threshold=-INF, criterion="max_prob", exit_id=0, exit_count=None,
             device="cpu", atol=CONF_ATOL):
    """The kernel on ``device`` and the reference on CPU, same inputs: ((buffers, ExitStep) of
    each, on CPU). On CUDA the CPU kernel must agree with the CUDA kernel too (confidences
    within ``atol``)."""
    kwargs = dict(threshold=threshold, criterion=criterion, exit_id=exit_id, exit_count=exit_count)
    logits, active, hidden = cpu(logits), cpu(active), cpu(hidden)
    kernel = _call_kernel(logits, active, hidden, n, device, **kwargs)
    ref_bufs = buffers(n)
    ref = early_exit_step_reference(
        logits, active, hidden, *ref_bufs, threshold, CRITERIA[criterion], exit_id,
        -1 if exit_count is None else exit_count,
    )
    if torch.device(device).type != "cpu":
        assert_same(kernel, _call_kernel(logits, active, hidden, n, "cpu", **kwargs), atol=atol)
    return kernel, (ref_bufs, ref)


def assert_same(kernel, ref, atol=CONF_ATOL):
    (k_pred, k_exit, k_conf), k_step = kernel
    (r_pred, r_exit, r_conf), r_step = ref
    assert torch.equal(k_exit, r_exit)
    assert torch.equal(k_pred, r_pred)
    assert torch.equal(k_conf.isnan(), r_conf.isnan())
    assert max_abs_err(k_conf.nan_to_num(), r_conf.nan_to_num()) <= atol
    assert torch.equal(k_step.survivor_index, r_step.survivor_index)
    assert torch.equal(k_step.keep_local, r_step.keep_local)
    assert k_step.hidden.shape == r_step.hidden.shape and torch.equal(k_step.hidden, r_step.hidden)


def confidences(logits, criterion, device):
    """(confidence, prediction) of the kernel on ``device``, as CPU tensors."""
    conf, pred = exit_confidence(logits.to(device), criterion)
    return conf.cpu(), pred.cpu()


def make_logits(m: int, c: int, *, seed: int = 0, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(m, c, generator=gen)).to(dtype)


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("num_classes", [1, 2, 3, 10, 16, 17, 100, 1000])
@pytest.mark.parametrize("num_rows", [1, 7, 9, 256])
def test_confidence_matches_reference(criterion, num_classes, num_rows, device):
    logits = make_logits(num_rows, num_classes, seed=num_rows * 7 + num_classes)
    conf, pred = confidences(logits, criterion, device)
    ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
    assert conf.dtype == torch.float32 and pred.dtype == torch.int64
    assert max_abs_err(conf, ref_conf) <= CONF_ATOL
    assert torch.equal(pred, ref_pred)
    assert ((conf >= 0) & (conf <= 1)).all()


LN = math.log
# Hand-computed confidences (max_prob, margin, entropy) of rows whose softmax is known exactly.
# entropy confidence = 1 - H(p) / ln C with H in nats; for p = (1/4, 3/4) over C = 2 that is
# 1 - (2 - (3/4) log2 3) = (3/4) log2 3 - 1; over C = 3 with one zero class it is 1 - H / ln 3.
HAND_CONFIDENCES = [
    ([0.0, LN(3)], (0.75, 0.5, 0.75 * math.log2(3) - 1)),                       # p = (1/4, 3/4)
    ([LN(0.5), LN(0.3), LN(0.2)], (0.5, 0.2, 0.0627694368)),                   # H = 1.0296530 nats
    ([100 + LN(0.7)] + [100 + LN(0.1)] * 3, (0.7, 0.6, 0.3216101753)),         # shift invariant
    ([1.0, 1.0, 1.0, 1.0], (0.25, 0.0, 0.0)),                                  # uniform: no confidence
    ([2.0, 2.0, 0.0], (math.e ** 2 / (2 * math.e ** 2 + 1), 0.0, None)),       # a tie on top: margin 0
    ([0.0, -INF, LN(3)], (0.75, 0.5, 1 - 0.5623351446 / LN(3))),               # -inf: probability 0
    ([1000.0, 0.0], (1.0, 1.0, 1.0)),                                          # certain
    ([5.0], (1.0, 1.0, 1.0)),                                                  # one class
]


@pytest.mark.parametrize("row,want", HAND_CONFIDENCES,
                         ids=lambda v: str(v)[:24] if isinstance(v, list) else "")
def test_confidence_hand_values(row, want, device):
    """max_prob = max p, margin = p(1) - p(2) (top two), entropy = 1 - H(p)/ln C, by hand."""
    logits = torch.tensor([row, row[::-1]], dtype=torch.float32)  # the reversed row: same confidence
    for criterion, value in zip(("max_prob", "margin", "entropy"), want):
        if value is None:
            continue
        conf, pred = confidences(logits, criterion, device)
        ref_conf, _ = exit_confidence_reference(logits, criterion)
        assert conf.tolist() == pytest.approx([value, value], abs=2e-6), criterion
        assert ref_conf.tolist() == pytest.approx([value, value], abs=2e-6), criterion
        assert pred.tolist() == [row.index(max(row)), row[::-1].index(max(row))]  # ties: the first


def independent_confidence(row: list[float], criterion: str) -> float:
    """The confidence of one row from the definitions, in float64 Python arithmetic (no torch):
    NaN when the softmax is undefined (a NaN or +inf logit, or every logit -inf)."""
    if any(math.isnan(v) or v == INF for v in row) or all(v == -INF for v in row):
        return NAN
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = math.fsum(exps)
    probs = sorted((e / total for e in exps), reverse=True)
    if criterion == "max_prob":
        return probs[0]
    if criterion == "margin":
        return probs[0] - probs[1] if len(row) > 1 else probs[0]
    if len(row) == 1:
        return 1.0
    log_total = math.log(total)
    entropy = -math.fsum(math.exp(v - top - log_total) * (v - top - log_total) for v in row if v != -INF)
    return min(1.0, max(0.0, 1.0 - entropy / math.log(len(row))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_low_precision_logits(dtype, num_classes, device):
    logits = make_logits(33, num_classes, seed=3, dtype=dtype)
    for criterion in CRITERIA:
        conf, pred = confidences(logits, criterion, device)
        ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
        assert max_abs_err(conf, ref_conf) <= CONF_ATOL
        assert torch.equal(pred, ref_pred)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vocabulary_sized_rows_accuracy(dtype, device):
    """C = 32000: the fp32 sums over the row stay within 1e-5 of torch's (a single sequential
    accumulator in the scalar bf16/fp16 path was 5e-5 off; now 8 partial sums, ~4e-6)."""
    gen = torch.Generator().manual_seed(32000)
    logits = (4 * torch.randn(24, 32000, generator=gen)).to(dtype)
    logits[::5, -1] += 40
    for criterion in CRITERIA:
        conf, pred = confidences(logits, criterion, device)
        ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
        assert max_abs_err(conf, ref_conf) <= 1e-5, criterion
        assert torch.equal(pred, ref_pred)


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("num_classes", [2, 10, 40])
@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.8, 1.0])
def test_threshold_step_matches_reference(criterion, num_classes, quantile, device):
    n, m = 300, 200
    gen = torch.Generator().manual_seed(num_classes)
    active = torch.randperm(n, generator=gen)[:m]  # a scattered subset of the batch
    logits = make_logits(m, num_classes, seed=num_classes + 1)
    hidden = torch.randn(m, 3, 4, generator=gen)
    threshold = safe_threshold(exit_confidence_reference(logits, criterion)[0], quantile)
    kernel, ref = run_both(logits, active, hidden, n, threshold=threshold, criterion=criterion, exit_id=4,
                           device=device)
    assert_same(kernel, ref)
    (_, exit_buf, _), _step = kernel
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[active] = False
    assert (exit_buf[untouched] == -9).all(), "positions outside active_index must not be written"
    assert set(exit_buf[active].unique().tolist()) <= {4, -9}


@pytest.mark.parametrize("hidden_shape", [None, (), (256,), (3, 5, 5)])
def test_hidden_gather_shapes(hidden_shape, device):
    m = 50
    logits = make_logits(m, 10, seed=5)
    hidden = None if hidden_shape is None else torch.randn(m, *hidden_shape, device=device)
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.5)
    step = early_exit_step(logits.to(device), torch.arange(m, device=device), hidden, *buffers(m, device),
                           threshold=threshold)
    kernel, ref = run_both(logits, torch.arange(m), hidden, m, threshold=threshold, device=device)
    assert_same(kernel, ref)
    if hidden is None:
        assert step.hidden.numel() == 0
    else:
        assert step.hidden.shape == (step.keep_local.shape[0], *hidden_shape)
        assert step.hidden.device == hidden.device
        assert step.hidden.data_ptr() != hidden.data_ptr()


def test_strided_inputs(device):
    m, c = 64, 12
    logits = make_logits(c, m, seed=6).t()  # column stride 64
    hidden = torch.randn(8, m).t()  # non-contiguous hidden
    active = torch.arange(2 * m)[::2]  # non-contiguous active_index
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.4)
    kernel, ref = run_both(logits, active, hidden, 2 * m, threshold=threshold, exit_id=1, device=device)
    assert_same(kernel, ref)


def test_infinite_thresholds(device):
    m = 40
    logits = make_logits(m, 10, seed=8)
    hidden = torch.randn(m, 6)
    (pred, exits, conf), step = run_both(logits, torch.arange(m), hidden, m, threshold=INF, device=device)[0]
    assert (exits == -9).all() and (pred == -7).all() and (conf == -5.0).all()
    assert torch.equal(step.survivor_index, torch.arange(m)) and torch.equal(step.hidden, hidden)
    direct = early_exit_step(logits.to(device), torch.arange(m, device=device), hidden.to(device),
                             *buffers(m, device), threshold=INF)
    assert direct.hidden.data_ptr() != hidden.data_ptr(), "must never return the input buffer"
    (pred, exits, conf), step = run_both(logits, torch.arange(m), hidden, m, threshold=-INF, exit_id=2,
                                         device=device)[0]
    assert (exits == 2).all() and torch.equal(pred, logits.argmax(1))
    assert step.survivor_index.numel() == 0 and step.hidden.shape == (0, 6)


# ---------------------------------------------------------------------------------------
# Non-finite logits: one rule on every backend (ops/early_exit.py module docstring).

NONFINITE_ROWS = [
    [INF, 0.0, 1.0],  # +inf: torch.softmax gives NaN (inf - inf)
    [INF, INF, 0.0],
    [INF, -INF, 2.0],
    [-INF, -INF, -INF],  # every logit -inf: NaN
    [NAN, 0.0, 1.0],
    [1.0, NAN, INF],
    [-INF, 0.0, 1.0],  # -inf beside a finite maximum: probability 0, a normal row
    [-INF, -INF, 3.0],  # certain
    [2.0, 2.0, -1.0],  # a tie: first index
    [0.5, -0.25, 0.0],
]


def nonfinite_logits(num_classes: int, dtype, layout: str) -> torch.Tensor:
    """The NONFINITE_ROWS, padded to ``num_classes`` with -inf (a no-op for torch's softmax
    of finite rows) after the first three columns, placed so that the special values land
    in the last vector chunk too (columns C-3..C-1), in the given memory layout."""
    base = torch.tensor(NONFINITE_ROWS)
    rows = torch.full((len(NONFINITE_ROWS) * 2, num_classes), -INF)
    rows[: len(base), :3] = base
    rows[len(base):, num_classes - 3:] = base
    rows = rows.to(dtype)
    if layout == "transposed":  # column stride != 1: the strided scalar path
        return rows.t().contiguous().t()
    return rows


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("num_classes", [3, 16, 17, 40])  # block8 / wide-row paths on AVX2 CPUs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_nonfinite_rows_match_reference(criterion, num_classes, dtype, layout, device):
    logits = nonfinite_logits(num_classes, dtype, layout)
    conf, pred = confidences(logits, criterion, device)
    ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
    softmax_nan = logits.float().softmax(-1).isnan().any(-1)
    assert torch.equal(ref_conf.isnan(), softmax_nan)  # the reference states the rule
    assert torch.equal(conf.isnan(), softmax_nan), conf
    assert torch.equal(pred, ref_pred) and torch.equal(pred, logits.argmax(-1))
    finite = ~softmax_nan
    assert ((conf[finite] >= 0) & (conf[finite] <= 1)).all(), conf
    assert max_abs_err(conf[finite], ref_conf[finite]) <= CONF_ATOL


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("num_classes", [3, 40])
def test_nonfinite_rows_never_exit_before_the_last_exit(criterion, num_classes, device):
    logits = nonfinite_logits(num_classes, torch.float32, "contiguous")
    m = logits.shape[0]
    bad = logits.softmax(-1).isnan().any(-1)
    # threshold 0: every finite row exits (confidence >= 0), no non-finite one.
    kernel, ref = run_both(logits, torch.arange(m), torch.randn(m, 2), m, threshold=0.0, criterion=criterion,
                           exit_id=1, device=device)
    assert_same(kernel, ref)
    (_, exits, _), step = kernel
    assert torch.equal(exits == 1, ~bad) and torch.equal(step.survivor_index, bad.nonzero().squeeze(1))
    # Quota: a count of all rows (or more) takes only the eligible ones.
    for count in (m, m + 5, int((~bad).sum()) - 1):
        kernel, ref = run_both(logits, torch.arange(m), None, m, criterion=criterion, exit_count=count,
                               exit_id=1, device=device)
        assert_same(kernel, ref)
        exits = kernel[0][1]
        assert not (exits[bad] == 1).any() and int((exits == 1).sum()) == min(count, int((~bad).sum()))
    # The last exit (threshold -inf) takes everyone, NaN confidence included.
    (pred, exits, conf), _ = run_both(logits, torch.arange(m), None, m, criterion=criterion, exit_id=2,
                                      device=device)[0]
    assert (exits == 2).all() and torch.equal(conf.isnan(), bad) and torch.equal(pred, logits.argmax(-1))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    c=st.integers(1, 40),
    criterion=st.sampled_from(list(CRITERIA)),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 3e38]),
    special=st.lists(st.sampled_from([INF, -INF, NAN, 3e38, -3e38]), max_size=4),
)
def test_fuzz_confidence_in_unit_interval_or_nan(c, criterion, seed, scale, special, device):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(8, c, generator=gen)).clamp(-3e38, 3e38)
    for j, value in enumerate(special):
        logits[j % 8, (7 * j) % c] = value
    conf, pred = confidences(logits, criterion, device)
    ref_conf, ref_pred = exit_confidence_reference(logits, criterion)
    assert torch.equal(conf.isnan(), ref_conf.isnan())
    assert ((conf >= 0) & (conf <= 1) | conf.isnan()).all(), conf
    assert torch.equal(pred, ref_pred)
    # The values, against the definitions in float64 (not the reference's torch code).
    want = torch.tensor([independent_confidence(row, criterion) for row in logits.double().tolist()])
    assert torch.equal(conf.isnan(), want.isnan()), (conf, want)
    assert max_abs_err(conf.nan_to_num(), want.nan_to_num()) <= 1e-5, (conf, want)


def test_wide_scan_reads_nothing_past_the_tensor():
    """The last row of an fp32 tensor with a partial tail chunk (C = 17: 7 lanes past the
    end) ends exactly at a page followed by an inaccessible guard page; its maximum sits in
    the tail, so the argmax scan must reach the tail. Run in a subprocess: a read past the
    end is a SIGSEGV there, a failed test here."""
    import subprocess
    import sys

    script = r"""
import ctypes, mmap, torch, ann_kernels
from ann_kernels.ops.early_exit import exit_confidence
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
base = libc.mmap(None, 2 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
assert libc.mprotect(base + page, page, 0) == 0  # PROT_NONE
rows, classes = 3, 17
count = rows * classes
buf = (ctypes.c_float * count).from_address(base + page - 4 * count)
logits = torch.frombuffer(buf, dtype=torch.float32).view(rows, classes)
logits.copy_(torch.arange(count, dtype=torch.float32).view(rows, classes) / 10)
for criterion in ("max_prob", "entropy", "margin"):
    conf, pred = exit_confidence(logits, criterion)
    assert pred.tolist() == [16, 16, 16], pred
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-2000:])


# ---------------------------------------------------------------------------------------
# Hidden-state layouts through compaction.


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "channels_last_3d", "channels_last_one_row", "sliced", "batch_transposed"],
)
def test_hidden_layout_kept_through_compaction(layout, device):
    m = 1 if layout == "channels_last_one_row" else 37
    gen = torch.Generator().manual_seed(21)
    if layout == "channels_last_3d":
        hidden = torch.randn(m, 3, 2, 4, 5, generator=gen).to(memory_format=torch.channels_last_3d)
        fmt = torch.channels_last_3d
    elif layout == "batch_transposed":
        hidden = torch.randn(6, m, generator=gen).t()  # dense, but the batch dim is innermost
        fmt = torch.contiguous_format
    else:
        hidden = torch.randn(m, 3, 4, 6, generator=gen).to(memory_format=torch.channels_last)
        fmt = torch.channels_last
        if layout == "sliced":
            hidden = hidden[:, :, :, ::2]  # not dense: made dense in its suggested format
    logits = make_logits(m, 10, seed=22)
    threshold = safe_threshold(exit_confidence_reference(logits)[0], 0.5) if m > 1 else INF
    hidden_dev = hidden.to(device)  # .to keeps the memory format
    step = early_exit_step(logits.to(device), torch.arange(m, device=device), hidden_dev, *buffers(m, device),
                           threshold=threshold)
    expected = hidden.index_select(0, step.keep_local.cpu())
    assert torch.equal(step.hidden.cpu(), expected)
    assert step.hidden.is_contiguous(memory_format=fmt), step.hidden.stride()
    ref = early_exit_step_reference(logits, torch.arange(m), hidden, *buffers(m), threshold, 0, 0, -1)
    assert ref.hidden.stride() == step.hidden.stride() and torch.equal(ref.hidden, expected)  # same layout
    if layout == "channels_last":
        assert step.hidden.stride() == (hidden.stride(0), 1, *hidden.stride()[2:])


@pytest.mark.cuda
@requires_cuda
def test_cuda_channels_last_gather_makes_no_full_copy():
    """The CUDA binding gathers channels_last rows directly: the peak memory of a call that
    keeps nobody stays far below one copy of the hidden state (it used to be .contiguous()d)."""
    m, device = 512, "cuda"
    hidden = torch.randn(m, 64, 32, 32, device=device).to(memory_format=torch.channels_last)  # 128 MiB
    logits = torch.zeros(m, 10, device=device)
    bufs = buffers(m, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step = early_exit_step(logits, torch.arange(m, device=device), hidden, *bufs, threshold=-INF)
    torch.cuda.synchronize()
    assert step.hidden.shape[0] == 0
    assert torch.cuda.max_memory_allocated() - before < hidden.numel() * 4 // 16


def test_nan_rows_exit_only_at_minus_inf(device):
    logits = make_logits(9, 10, seed=9)
    logits[3, 4] = NAN
    conf, pred = confidences(logits, "max_prob", device)
    assert math.isnan(conf[3]) and int(pred[3]) == 4  # torch.argmax: NaN is the maximum
    (_, exits, _), step = run_both(logits, torch.arange(9), None, 9, threshold=0.0, device=device)[0]
    assert int(exits[3]) == -9 and 3 in step.survivor_index.tolist()
    (_, exits, _), _ = run_both(logits, torch.arange(9), None, 9, threshold=-INF, device=device)[0]
    assert (exits == 0).all()


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("count", [0, 1, 37, 100, 130])
def test_quota_matches_reference(criterion, count, device):
    m = 100
    logits = make_logits(m, 10, seed=count + 11)
    active = torch.arange(m) * 3
    conf = exit_confidence_reference(logits, criterion)[0].sort(descending=True).values
    if 0 < count < m and float(conf[count - 1] - conf[count]) <= 1e-5:
        pytest.skip("boundary confidences too close for an exact set comparison")
    kernel, ref = run_both(
        logits, active, torch.randn(m, 2), 3 * m, criterion=criterion, exit_count=count, exit_id=5, device=device
    )
    assert_same(kernel, ref)
    assert int((kernel[0][1] == 5).sum()) == min(count, m)


def test_quota_ties_take_row_order(device):
    logits = torch.zeros(10, 4)  # every confidence equal
    (_, exits, _), step = run_both(logits, torch.arange(10), None, 10, exit_count=3, device=device)[0]
    assert exits.tolist() == [0, 0, 0] + [-9] * 7
    assert step.survivor_index.tolist() == list(range(3, 10))


def test_direct_binding_equals_torch_ops(device):
    from ann_kernels import _C

    m = 64
    logits, hidden = make_logits(m, 10, seed=12).to(device), torch.randn(m, 16, device=device)
    threshold = safe_threshold(exit_confidence_reference(logits.cpu())[0], 0.5)
    a, b = buffers(m, device), buffers(m, device)
    active = torch.arange(m, device=device)
    out_ops = torch.ops.ann_kernels.early_exit_step(logits, active, hidden, *a, threshold, 0, 1, -1)
    out_direct = _C.early_exit_step(logits, active, hidden, *b, threshold, 0, 1, -1)
    for x, y in zip(list(a) + list(out_ops), list(b) + list(out_direct)):
        assert torch.equal(x, y)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
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
def test_fuzz_against_reference(m, c, criterion, quantile, use_quota, count, seed, scale, device):
    logits = make_logits(m, c, seed=seed, scale=scale)
    ref_conf = exit_confidence_reference(logits, criterion)[0]
    n = m + 5
    active = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
    hidden = torch.randn(m, 3)
    if use_quota:
        ordered = ref_conf.sort(descending=True).values
        if 0 < count < m:
            assume(float(ordered[count - 1] - ordered[count]) > 1e-5)
        kernel, ref = run_both(logits, active, hidden, n, criterion=criterion, exit_count=count, exit_id=2,
                               device=device)
    else:
        kernel, ref = run_both(logits, active, hidden, n, criterion=criterion, exit_id=2,
                               threshold=safe_threshold(ref_conf, quantile), device=device)
    assert_same(kernel, ref)


@pytest.mark.parametrize("case", ["threshold", "quota", "no_hidden", "all_exit", "channels_last", "sliced"])
def test_opcheck(case, device):
    m, n = 24, 30
    logits = make_logits(m, 10, seed=13).to(device)
    hidden = None if case == "no_hidden" else torch.randn(m, 5, device=device)
    if case == "channels_last":
        hidden = torch.randn(m, 2, 3, 3, device=device).to(memory_format=torch.channels_last)
    if case == "sliced":  # not dense: the kernels make it dense in its suggested format
        hidden = torch.randn(m, 2, 3, 6, device=device).to(memory_format=torch.channels_last)[..., ::2]
    threshold = {"all_exit": -INF}.get(case, 0.6)
    count = 7 if case == "quota" else -1
    args = (logits, torch.randperm(n)[:m].to(device), hidden, *buffers(n, device), threshold, 0, 3, count)
    torch.library.opcheck(torch.ops.ann_kernels.early_exit_step.default, args)


def test_bad_inputs_name_the_argument(device):
    m = 8
    logits = make_logits(m, 5).to(device)
    good = {"threshold": 0.5}
    ar = torch.arange(m, device=device)
    with pytest.raises(ValueError, match="active_index"):
        early_exit_step(logits, ar[:-1], None, *buffers(m, device), **good)
    with pytest.raises(ValueError, match="active_index"):
        early_exit_step(logits, ar.int(), None, *buffers(m, device), **good)
    with pytest.raises(ValueError, match="threshold"):
        early_exit_step(logits, ar, None, *buffers(m, device), threshold=NAN)
    with pytest.raises(ValueError, match="criterion"):
        early_exit_step(logits, ar, None, *buffers(m, device), threshold=0.5, criterion="softmax")
    with pytest.raises(ValueError, match="hidden"):
        early_exit_step(logits, ar, torch.zeros(m + 1, 2, device=device), *buffers(m, device), **good)
    pred, exits, conf = buffers(m, device)
    with pytest.raises(ValueError, match="confidence"):
        early_exit_step(logits, ar, None, pred, exits, conf.double(), **good)
    with pytest.raises(ValueError, match="exit_count"):
        early_exit_step(logits, ar, None, *buffers(m, device), exit_count=-2)
    with pytest.raises(ValueError, match="logits"):
        early_exit_step(logits[0], ar, None, *buffers(m, device), **good)
    with pytest.raises(RuntimeError, match="out of range"):  # the kernel's own check
        early_exit_step(logits, ar + 100, None, *buffers(m, device), threshold=-INF)
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.ann_kernels.early_exit_step(logits, ar, None, *buffers(m, device), NAN, 0, 0, -1)
    if torch.device(device).type == "cuda":
        with pytest.raises(ValueError, match="active_index is on cpu"):
            early_exit_step(logits, ar.cpu(), None, *buffers(m, device), **good)


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
