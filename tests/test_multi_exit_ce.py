"""The fused multi-exit cross-entropy (C++ CPU kernel + C++ autograd) against its
pure-torch reference: forward, gradients, side outputs, the AdaLoss state, bad input."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ann_kernels
from ann_kernels import multi_exit_cross_entropy, multi_exit_cross_entropy_reference
from tests.utils import grads_of, low_precision_bound, make_logits, make_target, max_abs_err, requires_ext

pytestmark = requires_ext

# Gradient tolerances (fp32): per entry rtol (two fp32 computations of lse over up to 50257
# classes differ by ~2e-5 relative), plus an absolute floor of 1e-7 of the largest entry or
# row scale (only the cancellation p - 1 at the target needs it, e.g. C = 1: p - 1 = 0).
GRAD_RTOL = 5e-5
GRAD_ATOL_OF_MAX = 1e-7


def run_both(heads, target, weights=None, **kwargs):
    """(fused ExitLoss, fused grads, reference ExitLoss, reference grads) on the same inputs."""
    fused = multi_exit_cross_entropy(heads, target, weights, **kwargs)
    fused_grads = grads_of(fused.loss, heads)
    ref = multi_exit_cross_entropy_reference(heads, target, weights, **kwargs)
    ref_grads = grads_of(ref.loss, heads)
    return fused, fused_grads, ref, ref_grads


def assert_matches_reference(heads, target, weights=None, *, atol=2e-5, **kwargs):
    fused, fused_grads, ref, ref_grads = run_both(heads, target, weights, **kwargs)
    scale = max(1.0, abs(ref.loss.item()))
    assert max_abs_err(fused.loss, ref.loss) <= atol * scale
    assert max_abs_err(fused.per_exit, ref.per_exit) <= atol * scale
    assert max_abs_err(fused.per_sample, ref.per_sample) <= atol * max(1.0, ref.per_sample.abs().max().item())
    assert max_abs_err(fused.confidence, ref.confidence) <= 1e-5
    assert torch.equal(fused.prediction, ref.prediction)
    # the gradients' natural size: the largest row scale w_k / N_valid
    n_valid = max(1, int((target != kwargs.get("ignore_index", -100)).sum()))
    row_scale = (1.0 if weights is None else float(torch.as_tensor(weights).max())) / n_valid
    for g, r in zip(fused_grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        # entry by entry (issue 24): relative, with an absolute floor far below the entries
        # (a dropped label-smoothing term e/C, or zeroed small entries, must show)
        floor = GRAD_ATOL_OF_MAX * max(r.abs().max().item(), row_scale)
        torch.testing.assert_close(g, r, rtol=GRAD_RTOL, atol=floor)
    return fused, fused_grads


@pytest.mark.parametrize("num_exits", range(1, 9))
@pytest.mark.parametrize("num_classes", [2, 7, 10, 100, 1000])
def test_matches_reference_exits_and_classes(num_exits, num_classes):
    heads = make_logits(num_exits, 5, num_classes, seed=num_exits * 1000 + num_classes)
    target = make_target(5, num_classes, seed=num_classes)
    weights = torch.rand(num_exits, generator=torch.Generator().manual_seed(num_exits))
    assert_matches_reference(heads, target, weights)


@pytest.mark.parametrize("num_classes", [32000, 50257])
@pytest.mark.parametrize("n", [1, 3])
def test_matches_reference_large_vocab(num_classes, n):
    heads = make_logits(2, n, num_classes, seed=n)
    target = make_target(n, num_classes)
    assert_matches_reference(heads, target, torch.tensor([0.3, 1.0]), label_smoothing=0.1)


@pytest.mark.parametrize("n", [1, 3, 17, 129])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_ignore_index_and_smoothing(n, label_smoothing, ignore_frac):
    heads = make_logits(3, n, 11, seed=n)
    target = make_target(n, 11, ignore_frac=ignore_frac, ignore_index=-1, seed=n + 1)
    assert_matches_reference(heads, target, ignore_index=-1, label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_rows_ignored_gives_zero_loss_and_zero_grad(label_smoothing):
    heads = make_logits(3, 4, 6)
    target = torch.full((4,), -100)
    fused, grads = assert_matches_reference(heads, target, label_smoothing=label_smoothing)
    assert fused.loss.item() == 0.0 and torch.all(fused.per_exit == 0)
    assert all(torch.all(g == 0) for g in grads)
    assert torch.isfinite(fused.confidence).all()


def test_equals_weighted_sum_of_cross_entropy():
    heads = make_logits(4, 9, 13)
    target = make_target(9, 13, ignore_frac=0.3)
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0])
    fused = multi_exit_cross_entropy(heads, target, weights, label_smoothing=0.05)
    expected = sum(w * F.cross_entropy(z, target, label_smoothing=0.05) for w, z in zip(weights, heads))
    torch.testing.assert_close(fused.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_of(fused.loss, heads), grads_of(expected, heads), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_low_precision_error_within_twice_torch(dtype, num_classes):
    heads_lp = make_logits(3, 33, num_classes, dtype, seed=7)
    target = make_target(33, num_classes, ignore_frac=0.2)
    heads_fp32 = [z.detach().float().requires_grad_() for z in heads_lp]
    truth = multi_exit_cross_entropy_reference(heads_fp32, target, label_smoothing=0.1)
    truth_grads = grads_of(truth.loss, heads_fp32)
    fused, fused_grads, torch_ref, torch_grads = run_both(heads_lp, target, label_smoothing=0.1)
    # torch's own low-precision answer: F.cross_entropy on the half tensors.
    torch_lp = sum(F.cross_entropy(z, target, label_smoothing=0.1) for z in heads_lp)
    torch_lp_grads = grads_of(torch_lp, heads_lp)
    err, bound = low_precision_bound(fused.loss, torch_lp.float(), truth.loss)
    assert err <= bound
    for g, t, r in zip(fused_grads, torch_lp_grads, truth_grads):
        assert g.dtype == dtype
        err, bound = low_precision_bound(g.float(), t.float(), r)
        assert err <= bound, (err, bound)


def test_stacked_and_non_contiguous_inputs():
    base = torch.randn(3, 8, 40)
    stacked = base[:, :, :17].clone().requires_grad_()  # [K, N, C] leaf
    target = make_target(8, 17)
    fused = multi_exit_cross_entropy(stacked, target)
    (g_stacked,) = grads_of(fused.loss, [stacked])
    heads = [z.detach().requires_grad_() for z in stacked.unbind(0)]
    ref = multi_exit_cross_entropy_reference(heads, target)
    torch.testing.assert_close(fused.loss, ref.loss)
    torch.testing.assert_close(g_stacked, torch.stack(grads_of(ref.loss, heads)))
    # Row-strided (column slice) and transposed (column-major) heads.
    wide = torch.randn(8, 40, requires_grad=True)
    transposed = torch.randn(17, 8, requires_grad=True)
    heads = [wide[:, 3:20], transposed.t()]
    assert not heads[0].is_contiguous() and not heads[1].is_contiguous()
    assert_matches_reference(heads, target)


def test_zero_weights_and_extreme_logits():
    heads = make_logits(3, 6, 9, scale=1e4, seed=3)
    target = make_target(6, 9)
    fused, grads = assert_matches_reference(heads, target, torch.tensor([0.0, 1.0, 0.5]), atol=1e-3)
    assert torch.all(grads[0] == 0)
    assert torch.isfinite(fused.loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("num_classes", [5, 40])  # the eight-rows path (C <= 16) and the row path
def test_masked_logits_without_smoothing_stay_finite(num_classes):
    """A -inf logit (a masked class) off the target: torch gives a finite loss; the kernel
    must not form 0 * inf from the unused smoothing term."""
    heads = make_logits(2, 9, num_classes, requires_grad=False)
    target = make_target(9, num_classes)
    rows = torch.arange(9)
    for z in heads:
        z[rows, (target + 1) % num_classes] = float("-inf")  # never the target class
    heads = [z.requires_grad_() for z in heads]
    fused = multi_exit_cross_entropy(heads, target)
    ref = multi_exit_cross_entropy_reference(heads, target)
    assert torch.isfinite(fused.loss) and torch.isfinite(fused.per_sample).all()
    torch.testing.assert_close(fused.per_sample, ref.per_sample, rtol=1e-5, atol=1e-5)
    grads = grads_of(fused.loss, heads)
    ref_grads = grads_of(ref.loss, heads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_classes", [5, 40, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_logits_propagate_like_torch(num_classes, dtype):
    """A NaN logit (or a +inf maximum) makes that row's loss, confidence and gradient
    non-finite, as in torch, instead of being skipped by the kernel's clamped exp; the
    prediction is torch.argmax's (the first NaN); other rows are untouched."""
    heads = make_logits(2, 6, num_classes, dtype, requires_grad=False)
    target = make_target(6, num_classes)
    heads[0][1, 2] = float("nan")
    heads[1][4, 3] = float("inf")
    heads = [z.requires_grad_() for z in heads]
    fused = multi_exit_cross_entropy(heads, target)
    ref = multi_exit_cross_entropy_reference(heads, target)
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 1] = bad[1, 4] = True
    assert torch.equal(torch.isfinite(fused.per_sample), torch.isfinite(ref.per_sample))
    assert torch.isnan(fused.per_sample[0, 1]) and torch.isnan(fused.confidence[bad]).all()
    assert torch.isnan(fused.loss) and torch.isnan(fused.per_exit).all()
    assert torch.equal(fused.prediction, torch.stack([z.argmax(-1) for z in heads]))
    # the same fp32 row math on the same (rounded) logits: fp32 tolerances in both dtypes
    torch.testing.assert_close(fused.per_sample[~bad], ref.per_sample[~bad], rtol=1e-5, atol=1e-5)
    grads = grads_of(fused.loss, heads)
    assert torch.isnan(grads[0][1]).all() and torch.isnan(grads[1][4]).all()
    assert torch.isfinite(grads[0][0]).all() and torch.isfinite(grads[1][5]).all()


def test_side_outputs():
    heads = make_logits(2, 5, 4)
    heads[0].data[2] = torch.tensor([1.0, 3.0, 3.0, 0.0])  # tie: first index wins (torch.argmax)
    target = make_target(5, 4)
    fused = multi_exit_cross_entropy(heads, target)
    probs = torch.stack([z.softmax(-1) for z in heads]).detach()
    torch.testing.assert_close(fused.confidence, probs.amax(-1))
    assert torch.equal(fused.prediction, torch.stack([z.argmax(-1) for z in heads]))
    assert fused.prediction[0, 2].item() == 1
    assert fused.per_sample.shape == (2, 5) and fused.per_sample.dtype == torch.float32
    assert not fused.per_exit.requires_grad and not fused.per_sample.requires_grad


def test_ema_state_step_by_step():
    heads = make_logits(3, 7, 5)
    target = make_target(7, 5)
    ema = torch.full((3,), float("nan"))
    ema[1] = 2.0  # one entry already set
    out = multi_exit_cross_entropy(heads, target, ema=ema, momentum=0.9)
    expected = out.per_exit.clone()
    expected[1] = 0.9 * 2.0 + 0.1 * out.per_exit[1]
    torch.testing.assert_close(ema, expected)
    previous = ema.clone()
    out = multi_exit_cross_entropy(heads, target, ema=ema, momentum=0.9)
    torch.testing.assert_close(ema, 0.9 * previous + 0.1 * out.per_exit)
    # A non-finite L_k never enters the state.
    bad = [z.detach().clone() for z in heads]
    bad[0].mul_(2.0)  # a different finite loss for exit 0
    bad[2][0, 0] = float("inf")
    previous = ema.clone()
    out = multi_exit_cross_entropy(bad, target, ema=ema, momentum=0.9)
    assert not torch.isfinite(out.per_exit[2])
    assert ema[2].item() == previous[2].item()
    assert ema[0].item() != previous[0].item()


def test_ema_matches_reference_update():
    heads = make_logits(4, 6, 3)
    target = make_target(6, 3)
    ema_fused = torch.tensor([float("nan"), 1.0, 0.5, float("nan")])
    ema_ref = ema_fused.clone()
    for _ in range(3):
        multi_exit_cross_entropy(heads, target, ema=ema_fused, momentum=0.7)
        multi_exit_cross_entropy_reference(heads, target, ema=ema_ref, momentum=0.7)
    torch.testing.assert_close(ema_fused, ema_ref)


def test_backward_variants_retain_graph_and_scaled_grad_out():
    heads = make_logits(3, 5, 7)
    target = make_target(5, 7)
    ref = multi_exit_cross_entropy_reference(heads, target)
    ref_grads = grads_of(ref.loss, heads)
    out = multi_exit_cross_entropy(heads, target)
    (3.0 * out.loss).backward(retain_graph=True)  # grad_out = 3
    for z, r in zip(heads, ref_grads):
        torch.testing.assert_close(z.grad, 3.0 * r)
    first = [z.grad.clone() for z in heads]
    out.loss.backward(retain_graph=True)  # grad_out = 1: buffers handed over
    out.loss.backward()  # again: recomputed, not the (now caller-owned) buffers
    for z, f, r in zip(heads, first, ref_grads):
        torch.testing.assert_close(z.grad, f + 2.0 * r)


def test_caller_logits_untouched_and_grads_not_shared():
    heads = make_logits(2, 4, 5)
    target = make_target(4, 5)
    before = [z.detach().clone() for z in heads]
    g1 = grads_of(multi_exit_cross_entropy(heads, target).loss, heads)
    g2 = grads_of(multi_exit_cross_entropy(heads, target).loss, heads)
    for z, b in zip(heads, before):
        assert torch.equal(z.detach(), b)
    g1[0].add_(1.0)  # the caller owns its gradients: changing one must not change another
    assert not torch.equal(g1[0], g2[0])


def test_results_independent_of_thread_count():
    heads = make_logits(3, 300, 257, seed=5)
    target = make_target(300, 257, ignore_frac=0.1)
    threads = torch.get_num_threads()
    results = []
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        try:
            out = multi_exit_cross_entropy(heads, target, label_smoothing=0.1)
            results.append((out, grads_of(out.loss, heads)))
        finally:
            torch.set_num_threads(threads)
    (a, ga), (b, gb) = results
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_inference_mode_and_no_grad():
    heads = make_logits(2, 4, 5, requires_grad=False)
    target = make_target(4, 5)
    with torch.inference_mode():
        out = multi_exit_cross_entropy(heads, target)
    ref = multi_exit_cross_entropy_reference(heads, target)
    torch.testing.assert_close(out.loss, ref.loss)
    with torch.no_grad():
        out = multi_exit_cross_entropy(make_logits(2, 4, 5), target)
    assert out.loss.grad_fn is None


@pytest.mark.parametrize("op_name, dtype", [("multi_exit_ce", torch.float32), ("multi_exit_ce_fwd", torch.float32),
                                             ("multi_exit_ce_fwd", torch.float16)])  # fp16: an fp32 gradient
def test_opcheck(op_name, dtype):
    heads = make_logits(3, 5, 7, dtype, requires_grad=op_name == "multi_exit_ce")
    target = make_target(5, 7, ignore_frac=0.3)
    weights = torch.tensor([0.2, 1.0, 0.5])
    op = getattr(torch.ops.ann_kernels, op_name).default
    extra = (True,) if op_name == "multi_exit_ce_fwd" else ()
    for ema in (None, torch.tensor([float("nan"), 1.0, 2.0])):
        args = (heads, target, weights, -100, 0.1, ema, 0.9, *extra)
        torch.library.opcheck(op, args)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(6, 5) for _ in range(3)])
    x = torch.randn(8, 6)
    target = make_target(8, 5)

    def forward(ema):  # model + fused loss: one graph, no breaks
        return multi_exit_cross_entropy([m(x) for m in model], target, ema=ema, momentum=0.9).loss

    ema_eager = torch.full((3,), float("nan"))
    loss_eager = forward(ema_eager)
    loss_eager.backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ema_compiled = torch.full((3,), float("nan"))
    loss_compiled = torch.compile(forward, fullgraph=True)(ema_compiled)
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    for p, g in zip(model.parameters(), grads_eager):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(ema_compiled, ema_eager)


@settings(max_examples=40, deadline=None)
@given(
    num_exits=st.integers(1, 5),
    n=st.integers(1, 12),
    num_classes=st.integers(1, 70),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    scale=st.sampled_from([0.1, 3.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(num_exits, n, num_classes, smoothing, ignore_frac, scale, seed):
    heads = make_logits(num_exits, n, num_classes, scale=scale, seed=seed)
    target = make_target(n, num_classes, seed=seed + 1, ignore_frac=ignore_frac)
    weights = torch.rand(num_exits, generator=torch.Generator().manual_seed(seed))
    assert_matches_reference(heads, target, weights, label_smoothing=smoothing, atol=1e-4)


# --- bad input: each error names the argument -------------------------------------------


def _bad_cases():
    z = make_logits(2, 4, 5)
    y = make_target(4, 5)
    return {
        "target out of range": ((z, torch.tensor([0, 1, 5, 2])), {}, ValueError, r"target\[2\] = 5"),
        "negative target": ((z, torch.tensor([0, -3, 1, 2])), {}, ValueError, r"target\[1\] = -3"),
        "different N": (([z[0], torch.randn(3, 5)], y), {}, ValueError, r"logits\[1\] has shape"),
        "different C": (([z[0], torch.randn(4, 6)], y), {}, ValueError, r"logits\[1\] has shape"),
        "weights length": ((z, y, torch.ones(3)), {}, ValueError, r"weights: expected 2 values"),
        "negative weights": ((z, y, torch.tensor([1.0, -0.5])), {}, ValueError, r"weights: must be non-negative"),
        "int logits": (([torch.ones(4, 5, dtype=torch.int64)] * 2, y), {}, TypeError, r"logits\[0\]: expected float"),
        "float target": ((z, y.float()), {}, TypeError, r"target: expected int64"),
        "zero exits": (([], y), {}, ValueError, r"logits: expected at least one exit, got 0"),
        "mixed devices": (([z[0], torch.randn(4, 5, device="meta")], y), {}, ValueError, r"logits\[1\] is on meta"),
        "target shape": ((z, y[:3]), {}, ValueError, r"target: expected shape \[4\]"),
        "empty batch": (([torch.randn(0, 5)], torch.zeros(0, dtype=torch.int64)), {}, ValueError, r"empty batch"),
        "ema shape": ((z, y), {"ema": torch.zeros(3)}, ValueError, r"ema: expected a float32 tensor of shape \[2\]"),
        "smoothing": ((z, y), {"label_smoothing": 1.5}, ValueError, r"label_smoothing"),
        "3-d head": (([torch.randn(2, 4, 5)], y), {}, ValueError, r"logits\[0\]: expected shape \[N, C\]"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.parametrize("impl", [multi_exit_cross_entropy, multi_exit_cross_entropy_reference])
def test_bad_input_raises_naming_the_argument(case, impl):
    args, kwargs, error, pattern = _bad_cases()[case]
    with pytest.raises(error, match=pattern):
        impl(*args, **kwargs)


def test_extension_flag():
    assert ann_kernels.HAS_CPP_EXT
    assert hasattr(torch.ops.ann_kernels, "multi_exit_ce")




def test_pooled_gradient_buffers_are_reused_safely():
    from ann_kernels import _C
    from ann_kernels.ops.multi_exit_ce import empty_grad_cache

    heads = make_logits(2, 4, 40000, seed=11)  # 2 x 4 x 40000 fp32 = 1.28 MB: pooled
    target = make_target(4, 40000)
    first = grads_of(multi_exit_cross_entropy(heads, target).loss, heads)
    kept = [g.clone() for g in first]
    second = grads_of(multi_exit_cross_entropy(heads, target).loss, heads)  # `first` still alive
    for index, expected in enumerate(kept):
        assert torch.equal(first[index], expected) and torch.equal(second[index], expected)
        assert first[index].data_ptr() != second[index].data_ptr()
    del first, second
    assert _C.grad_cache_bytes() >= 2 * 4 * 40000 * 4
    third = grads_of(multi_exit_cross_entropy(heads, target).loss, heads)  # reuses a freed buffer
    assert all(torch.equal(t, k) for t, k in zip(third, kept))
    del third
    empty_grad_cache()
    assert _C.grad_cache_bytes() == 0
