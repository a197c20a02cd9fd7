"""The fused multi-exit loss in the training loops people run: any grad_out (GradScaler,
accumulation) in every dtype, learnable exit weights, per-sample weights, double backward,
inference_mode between steps, no gradient work under no_grad, thread-count independence.

Each test names the defect it would have caught (issue 10)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ann_kernels import multi_exit_cross_entropy, multi_exit_cross_entropy_reference
from ann_kernels.ops.multi_exit_ce import grad_cache_stats
from tests.low_precision_helpers import (
    check_fp16_case,
    check_fp16_extreme_logits,
    check_fp16_grad_scaler_scales,
    check_fp16_legacy_entry,
    check_fp16_tiny_grad_out,
)
from tests.utils import (
    DEVICES,
    assert_same_grad_scaler_runs,
    check_ema_two_steps_and_non_finite_rows,
    check_grad_out_within_twice_torch,
    grad_scaler_loop,
    grads_of,
    make_logits,
    make_target,
    max_abs_err,
    requires_ext,
)

pytestmark = requires_ext

LOW = (torch.bfloat16, torch.float16)
FP16_MAX = torch.finfo(torch.float16).max


def _heads(num_exits, n, c, dtype, device, *, seed=0, scale=3.0, requires_grad=True):
    return [z.to(device).requires_grad_(requires_grad)
            for z in make_logits(num_exits, n, c, dtype, seed=seed, scale=scale, requires_grad=False)]


def _truth_grads(heads, target, weights, grad_out, **kwargs):
    """float64 gradients of grad_out * reference loss (the truth)."""
    leaves = [z.detach().double().requires_grad_() for z in heads]
    num_classes = heads[0].shape[1]
    valid = target != kwargs.get("ignore_index", -100)
    n_valid = valid.sum().clamp(min=1).double()
    w = torch.ones(len(heads), dtype=torch.float64) if weights is None else weights.double().cpu()
    loss = sum(w[k] * F.cross_entropy(z, target, reduction="sum", **kwargs) / n_valid for k, z in enumerate(leaves))
    del num_classes
    return grads_of(loss * grad_out, leaves)


def _torch_autocast_grads(heads, target, weights, grad_out, **kwargs):
    """What PyTorch itself gives: F.cross_entropy(z.float(), y) (autocast-style), gradient
    rounded to the logits dtype by the cast's backward."""
    leaves = [z.detach().clone().requires_grad_() for z in heads]
    w = [1.0] * len(heads) if weights is None else weights.tolist()
    loss = sum(wk * F.cross_entropy(z.float(), target, **kwargs) for wk, z in zip(w, leaves))
    return grads_of(loss * grad_out, leaves)


# --- 1. any grad_out, every dtype -------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log2_scale", [-10, -2, 0, 4, 16, 24])
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_scaled_backward_within_twice_torch_error(device, dtype, log2_scale, num_classes):
    """Defect: fp16 gradients stored pre-scaled and multiplied by grad_out cast to fp16 (inf
    at 65536, zeros at small scales; bf16 rounded grad_out first)."""
    # fp16 at 2^24: enough rows (|g| <= 2^24 w_max / N_valid) that the true gradient fits
    # in fp16 (64 rows would overflow it: that case was always skipped before)
    n = 2048 if dtype == torch.float16 and log2_scale == 24 else 64
    heads = _heads(3, n, num_classes, dtype, device, seed=log2_scale + 20)
    target = make_target(n, num_classes, ignore_frac=0.1).to(device)
    weights = torch.tensor([0.3, 1.0, 2.0], device=device)
    grad_out = 2.0 ** log2_scale * (-1.0 if log2_scale == 4 else 1.0)  # a negative one too
    truth = _truth_grads([z.cpu() for z in heads], target.cpu(), weights, grad_out)
    if dtype == torch.float16:  # every case runs: the shape above keeps the gradient in range
        assert max(t.abs().max().item() for t in truth) <= FP16_MAX / 2
    out = multi_exit_cross_entropy(heads, target, weights)
    ours = torch.autograd.grad(out.loss, heads, torch.tensor(grad_out, device=device))
    theirs = _torch_autocast_grads(heads, target, weights, grad_out)
    for g, t, truth_k in zip(ours, theirs, truth):
        assert g.dtype == dtype and torch.isfinite(g).all()
        err, torch_err = max_abs_err(g.cpu(), truth_k), max_abs_err(t.cpu(), truth_k)
        tiny = 2.0 ** log2_scale * 1e-6 / n
        assert err <= 2 * torch_err + tiny, (err, torch_err)
        # relative: the gradient's size grows with grad_out, so must the tolerance
        rtol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        subnormal = 2.0 ** -24 if dtype == torch.float16 else 0.0  # fp16's absolute resolution
        torch.testing.assert_close(g.cpu().double(), truth_k, rtol=rtol, atol=abs(grad_out) * 2e-6 / n + subnormal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("grad_out", [1.0, 2.0 ** 16, 0.125, -3.0])
def test_low_precision_grad_out_within_twice_torch_error(device, dtype, grad_out):
    """Issue 20: bf16 and fp16 (gradient buffers, scaled in place; fp16's stored times 2^m)
    gradients for grad_out in {1, 2^16, 1/8, -3} within 2x torch's error against a float64
    truth and within two roundings entry by entry; bf16 bit-exact for powers of two."""
    check_grad_out_within_twice_torch(device, dtype, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("check", [check_fp16_grad_scaler_scales, check_fp16_tiny_grad_out, check_fp16_extreme_logits],
                         ids=["grad_scaler_2e16_2e24", "tiny_grad_out_2e-20", "extreme_logits_1e4"])
def test_fp16_gradient_buffer_within_two_roundings(device, check):
    """Issue 20, fp16 keeping its gradient from the forward (stored times 2^m): GradScaler's
    2^16 and 2^24 neither overflow nor give inf/NaN, grad_out = 2^-20 flushes nothing that
    torch keeps, +-1e4 logits and dominating rows stay exact; each case within the
    two-rounding bound entry by entry and 2x torch's error (tests/low_precision_helpers.py)."""
    check(device)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_legacy_entry_gradient_survives_any_grad_out(device):
    """The older entry ``multi_exit_ce_fwd`` (the gradient for grad_out = 1, scaled by its
    caller): fp16 logits get it in fp32 from the 2^m-scaled buffer, so GradScaler's 2^16,
    1/8 and -3 applied by the caller stay within two roundings and 2x torch's error; an fp16
    gradient would have flushed the small entries (tests/low_precision_helpers.py)."""
    check_fp16_legacy_entry(device)


def test_fp16_gradient_bits_do_not_depend_on_the_grad_out_hint():
    """CPU: the fp16 buffer's 2^m follows the last power-of-two grad_out (a steady GradScaler
    scale or grad_out = 1 then needs no pass over the buffer), but the gradient's bits never
    depend on it: after backwards with grad_out 2^16, 1, 1/8 or -3 (no power of two: no
    hint), every gradient equals, bit for bit, the reference path (stored at m_safe by grad_mode
    3, then multiplied in fp32 by grad_out 2^-m_safe and rounded once): no history leaks into
    resumed training or repeated calls. Without the second rounding of requantize_row, or with
    a hinted buffer scaled instead of recomputed, fp16's subnormal entries differ."""
    n, c = 64, 1000
    gen = torch.Generator().manual_seed(11)
    heads = [(3 * torch.randn(n, c, generator=gen)).half() for _ in range(3)]
    target = torch.randint(0, c, (n,), generator=gen)
    target[::9] = -100
    weights = torch.tensor([0.3, 1.0, 2.0])
    n_valid = int((target != -100).sum())
    m_safe = 15 - math.frexp(2.0 / n_valid)[1]
    forward = torch.ops.ann_kernels._multi_exit_ce_forward.default
    stored = forward(heads, target, weights, None, -100, 0.05, None, 0.9, 3)  # the reference buffer
    assert stored[5].tolist() == [2.0 ** -m_safe] * 2

    def grads(grad_out):
        leaves = [z.detach().clone().requires_grad_() for z in heads]
        loss = multi_exit_cross_entropy(leaves, target, weights, label_smoothing=0.05).loss
        return torch.autograd.grad(loss, leaves, torch.tensor(grad_out))

    outs = [2.0 ** 16, 1.0, 0.125, -3.0]
    for earlier in outs:
        for grad_out in outs:
            grads(earlier)
            hinted = forward(heads, target, weights, None, -100, 0.05, None, 0.9, 4)[5].tolist()
            m = min(m_safe, int(math.log2(earlier))) if earlier > 0 else m_safe
            assert hinted == [2.0 ** -m, 2.0 ** -m_safe], (earlier, hinted)
            want = (stored[6].float() * (grad_out * 2.0 ** -m_safe)).half()
            for k, ours in enumerate(grads(grad_out)):
                same = ours.view(torch.int16) == want[k].view(torch.int16)
                assert bool(same.all()), (earlier, grad_out, k, int((~same).sum()))
        check_fp16_case(heads, target, weights, earlier)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ema_two_steps_by_hand_and_non_finite_rows(device, dtype):
    """Issue 24: two AdaLoss steps against the hand formula; a non-finite logit row gives a
    NaN per-exit loss and leaves that exit's running average untouched."""
    check_ema_two_steps_and_non_finite_rows(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_scaler_loop_matches_cross_entropy_loop(dtype, device):
    """Defect: with torch.amp.GradScaler on fp16 exit logits the scale kept overflowing and
    halving (inf/NaN gradients) while F.cross_entropy's loop grew it without a skipped step.
    Every dtype, every device here (the Triton kernels also through the interpreter:
    tests/test_triton_multi_exit_ce_op.py runs the same loop)."""
    runs = grad_scaler_loop(dtype, device)
    assert_same_grad_scaler_runs(runs, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_accumulation_equals_one_big_batch(device, dtype):
    """Defect class: loss / accumulation_steps (grad_out = 1/4) scaled a rounded gradient."""
    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(8, 33) for _ in range(2)]).to(device)
    x, y = torch.randn(4 * 16, 8, device=device), torch.randint(0, 33, (4 * 16,), device=device)

    def grads(chunks):
        model.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks)):
            loss = multi_exit_cross_entropy([head(xs).to(dtype) for head in model], ys).loss
            (loss / chunks).backward()
        return [p.grad.clone() for p in model.parameters()]

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, b in zip(grads(4), grads(1)):
        torch.testing.assert_close(a, b, **tol)


# --- 2. learnable weights, sample weights -------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logits_need_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_learnable_exit_weights(device, logits_need_grad, dtype):
    """Defect: weights.requires_grad crashed (logits without grad) or weights.grad stayed None."""
    heads = _heads(3, 20, 7, dtype, device, requires_grad=logits_need_grad)
    target = make_target(20, 7, ignore_frac=0.2).to(device)
    weights = torch.tensor([0.5, 1.0, 1.5], device=device, requires_grad=True)
    out = multi_exit_cross_entropy(heads, target, weights, label_smoothing=0.1)
    (2.5 * out.loss).backward()
    w_ref = weights.detach().clone().requires_grad_()
    ref = multi_exit_cross_entropy_reference([z.detach() for z in heads], target, w_ref, label_smoothing=0.1)
    (2.5 * ref.loss).backward()
    torch.testing.assert_close(weights.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad, 2.5 * out.per_exit, rtol=1e-6, atol=0)  # dLoss/dw_k = L_k
    if logits_need_grad:  # the logits' gradients too, against the reference's
        ref_heads = [z.detach().clone().requires_grad_() for z in heads]
        (2.5 * multi_exit_cross_entropy_reference(ref_heads, target, weights.detach(), label_smoothing=0.1).loss
         ).backward()
        for z, r in zip(heads, ref_heads):
            torch.testing.assert_close(z.grad.float(), r.grad.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5,
                                       atol=r.grad.abs().max().item() * 1e-3 if dtype == torch.float16 else 1e-8)
    else:
        assert all(z.grad is None for z in heads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ["N", "KN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_weights_forward_and_all_gradients(device, shape, dtype):
    """sample_weights natively in the op: loss = sum_k w_k sum_i s_ik l_ik / N_valid, with
    gradients w.r.t. the logits, the exit weights and the sample weights."""
    num_exits, n, c = 3, 24, 11
    gen = torch.Generator().manual_seed(3)
    s = torch.rand((n,) if shape == "N" else (num_exits, n), generator=gen).add_(0.25).to(device)
    heads = _heads(num_exits, n, c, dtype, device, seed=4)
    target = make_target(n, c, ignore_frac=0.25).to(device)
    weights = torch.tensor([0.2, 1.0, 0.7], device=device)
    leaves = {"fused": ([z.detach().clone().requires_grad_() for z in heads], weights.clone().requires_grad_(),
                        s.clone().requires_grad_())}
    leaves["ref"] = tuple(
        ([z.detach().clone().requires_grad_() for z in hs], w.detach().clone().requires_grad_(),
         ss.detach().clone().requires_grad_()) for hs, w, ss in [leaves["fused"]])[0]
    results = {}
    for name, fn in (("fused", multi_exit_cross_entropy), ("ref", multi_exit_cross_entropy_reference)):
        hs, w, ss = leaves[name]
        out = fn(hs, target, w, sample_weights=ss, label_smoothing=0.05)
        (out.loss * -3.0).backward()
        results[name] = (out, [z.grad for z in hs], w.grad, ss.grad)
    (out, gz, gw, gs), (ref, rz, rw, rs) = results["fused"], results["ref"]
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.per_exit, ref.per_exit, rtol=1e-5, atol=1e-6)  # unweighted L_k
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-7)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    for a, b in zip(gz, rz):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("bad", ["weights", "sample_weights"])
@pytest.mark.parametrize("impl", [multi_exit_cross_entropy, multi_exit_cross_entropy_reference])
def test_nan_weights_rejected_on_every_cpu_path(bad, impl):
    """Defect: NaN weights were rejected by C++ but accepted by the reference."""
    heads, target = make_logits(2, 4, 5), make_target(4, 5)
    kwargs = {"weights": torch.tensor([1.0, float("nan")])} if bad == "weights" else \
        {"sample_weights": torch.tensor([1.0, 2.0, float("nan"), 1.0])}
    with pytest.raises(ValueError, match=rf"{bad}: must not be NaN"):
        impl(heads, target, **kwargs)
    with pytest.raises(ValueError, match=r"sample_weights: expected shape"):
        impl(heads, target, sample_weights=torch.ones(3))
    with pytest.raises(TypeError, match=r"sample_weights: expected float32"):
        impl(heads, target, sample_weights=torch.ones(4, dtype=torch.float64))


def test_argument_check_runs_on_every_device_before_dispatch():
    """Defect: the CUDA (Triton) path skipped the checks; they now run in the op's own
    Autograd / CompositeExplicitAutograd kernels, for any device (here: meta tensors)."""
    heads = [torch.empty(4, 5, device="meta") for _ in range(2)]
    op = torch.ops.ann_kernels.multi_exit_ce.default
    with pytest.raises(TypeError, match=r"target: expected int64"):
        op(heads, torch.empty(4, dtype=torch.int32, device="meta"), None, -100, 0.0, None, 0.9)
    with pytest.raises(ValueError, match=r"ema: expected a float32 tensor of shape \[2\]"):
        op(heads, torch.empty(4, dtype=torch.int64, device="meta"), None, -100, 0.0,
           torch.empty(5, device="meta"), 0.9)


# --- 3. double backward, modes, caches -----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_sample_weights", [False, True])
def test_double_backward_gradient_penalty(device, with_sample_weights):
    """Defect: create_graph=True silently dropped the second-order term."""
    n, c = 12, 6
    s = torch.rand(n, generator=torch.Generator().manual_seed(2)).add_(0.5).to(device) if with_sample_weights else None
    target = make_target(n, c, ignore_frac=0.2).to(device)
    results = []
    for fn in (multi_exit_cross_entropy, multi_exit_cross_entropy_reference):
        heads = _heads(2, n, c, torch.float32, device, seed=9)
        weights = torch.tensor([0.6, 1.3], device=device, requires_grad=True)
        loss = fn(heads, target, weights, sample_weights=s, label_smoothing=0.1).loss
        grads = torch.autograd.grad(loss, heads, create_graph=True)
        penalty = sum((g ** 2).sum() for g in grads)
        (loss + 10.0 * penalty).backward()
        results.append(([z.grad for z in heads], weights.grad))
    (gz, gw), (rz, rw) = results
    for a, b in zip(gz, rz):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inference_mode_call_then_training(dtype):
    """Defect: one call under inference_mode cached inference-tensor weights that later
    training calls could not save for backward."""
    heads, target = _heads(3, 8, 5, dtype, "cpu"), make_target(8, 5)
    with torch.inference_mode():
        evaluation = multi_exit_cross_entropy(heads, target)
    assert evaluation.loss.is_inference()
    out = multi_exit_cross_entropy(heads, target)
    out.loss.backward()
    ref_heads = [z.detach().clone().requires_grad_() for z in heads]
    ref = multi_exit_cross_entropy_reference(ref_heads, target)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for z, r in zip(heads, ref_heads):  # the gradients of the training call, not just present
        torch.testing.assert_close(z.grad.float(), r.grad.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5,
                                   atol=2.0 ** -24 if dtype == torch.float16 else 1e-8)


def test_fake_tensor_mode_then_real_call():
    """Nothing is cached across calls that FakeTensorMode (torch.compile / export) could poison."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = multi_exit_cross_entropy([torch.randn(4, 5, requires_grad=True) for _ in range(2)],
                                        torch.zeros(4, dtype=torch.int64))
        assert fake.loss.shape == ()
    heads, target = make_logits(2, 4, 5), make_target(4, 5)
    out = multi_exit_cross_entropy(heads, target)
    out.loss.backward()
    torch.testing.assert_close(out.loss, multi_exit_cross_entropy_reference(heads, target).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_writes_no_gradient_buffer(dtype):
    """Defect: under no_grad the full K x N x C gradient was computed and thrown away."""
    heads, target = _heads(3, 16, 300, dtype, "cpu"), make_target(16, 300)
    before = grad_cache_stats()["handed_out"]
    with torch.no_grad():
        out = multi_exit_cross_entropy(heads, target)
    with torch.inference_mode():
        multi_exit_cross_entropy(heads, target)
    assert out.loss.grad_fn is None
    assert grad_cache_stats()["handed_out"] == before
    multi_exit_cross_entropy(heads, target).loss.backward()  # with grad: exactly one buffer
    assert grad_cache_stats()["handed_out"] == before + 1


@pytest.mark.parametrize("grad_out", [1.0, 2.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradient_buffer_released_right_after_backward(grad_out, dtype):
    """Defect: with grad_out != 1 the saved [K, N, C] buffer stayed alive beside the scaled
    copy until the graph died (2x memory). The graph is retained here on purpose."""
    from ann_kernels import _C
    from ann_kernels.ops.multi_exit_ce import empty_grad_cache

    heads, target = _heads(2, 8, 40000, dtype, "cpu", seed=5), make_target(8, 40000)  # >= 1 MiB: pooled
    empty_grad_cache()
    out = multi_exit_cross_entropy(heads, target)
    out.loss.backward(torch.tensor(grad_out), retain_graph=True)
    # the gradients are views of the one buffer (handed over, scaled in place if needed)
    assert heads[1].grad.data_ptr() - heads[0].grad.data_ptr() == 8 * 40000 * heads[0].element_size()
    assert _C.grad_cache_bytes() == 0
    for z in heads:
        z.grad = None
    assert _C.grad_cache_bytes() >= 2 * 8 * 40000 * heads[0].element_size()  # nothing else held it
    out.loss.backward(torch.tensor(grad_out))  # a retained graph still gives the right answer
    truth = _truth_grads(heads, target, None, grad_out)
    atol = 1e-9 if dtype == torch.float32 else 2.0 ** -24  # fp16's subnormal spacing
    for z, t in zip(heads, truth):
        torch.testing.assert_close(z.grad.double(), t, rtol=2e-3, atol=atol)
    del out
    empty_grad_cache()


def test_grad_cache_bounded_by_what_the_last_steps_used():
    """Issue 21: the idle gradient cache (memory outside torch's allocator) holds at most the
    peak bytes in use over the last 8 requests, and grad_cache_stats() shows it: a big step
    stays cached for the next step; after 8 smaller steps the big block is freed."""
    from ann_kernels.ops.multi_exit_ce import empty_grad_cache

    def step(n):
        heads = _heads(2, n, 40000, torch.float32, "cpu", seed=n)
        multi_exit_cross_entropy(heads, make_target(n, 40000)).loss.backward()
        return 2 * n * 40000 * 4  # the step's gradient buffer (>= 1 MiB: pooled)

    empty_grad_cache()
    big = step(16)  # 5.12 MB, freed with its heads
    stats = grad_cache_stats()
    assert stats["in_use_bytes"] == 0 and stats["idle_bytes"] == big == stats["idle_limit_bytes"]
    hits = stats["hits"]
    step(16)  # served from the cache (no page faults)
    assert grad_cache_stats()["hits"] == hits + 1
    for _ in range(8):
        small = step(4)  # 1.28 MB: the big block wastes more than half, so it is not used
    stats = grad_cache_stats()
    assert stats["idle_bytes"] == small == stats["idle_limit_bytes"], stats
    empty_grad_cache()
    assert grad_cache_stats()["idle_bytes"] == 0


def test_ema_version_counter_bumped():
    """Defect: the in-place EMA write was invisible to autograd's version counter."""
    heads, target = make_logits(2, 4, 5), make_target(4, 5)
    ema = torch.full((2,), float("nan"))
    v0 = ema._version
    multi_exit_cross_entropy(heads, target, ema=ema)
    v1 = ema._version
    with torch.no_grad():
        multi_exit_cross_entropy(heads, target, ema=ema)
    assert v0 < v1 < ema._version


@pytest.mark.parametrize("num_classes", [3, 10, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_independence_small_classes(num_classes, dtype):
    """The eight-rows-per-vector path (C <= 16) and the low-precision gradient give
    bit-identical results with 1 and 2 threads (rows split differently between blocks).
    K N must exceed twice the kernel's per-task chunk (16384 / C rows), else both runs are
    serial and the test cannot fail (issue 24)."""
    n = 4001  # 3 * 4001 rows: two chunks even at C = 3 (5461 rows each), split off an 8-row boundary
    assert 3 * n > 2 * (16384 // num_classes) and (3 * n // 2) % 8 != 0
    heads = _heads(3, n, num_classes, dtype, "cpu", seed=6)
    target = make_target(n, num_classes, ignore_frac=0.1)
    threads = torch.get_num_threads()
    results = []
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        try:
            out = multi_exit_cross_entropy(heads, target, label_smoothing=0.1)
            results.append((out, torch.autograd.grad(out.loss, heads, torch.tensor(3.0))))
        finally:
            torch.set_num_threads(threads)
    (a, ga), (b, gb) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def _opcheck_cases():
    heads = make_logits(3, 5, 7)
    target = make_target(5, 7, ignore_frac=0.3)
    w = torch.tensor([0.2, 1.0, 0.5])
    s_n, s_kn = torch.rand(5) + 0.1, torch.rand(3, 5) + 0.1
    ema = torch.tensor([float("nan"), 1.0, 2.0])
    d = [z.detach() for z in heads]
    ops = torch.ops.ann_kernels
    lse = ops._multi_exit_ce_forward.default(d, target, w, None, -100, 0.1, None, 0.9, 2)[5]
    return [
        ("multi_exit_ce weights=None", ops.multi_exit_ce.default, (heads, target, None, -100, 0.1, None, 0.9)),
        ("multi_exit_ce s[N]", ops.multi_exit_ce.default, (heads, target, w, -100, 0.1, ema.clone(), 0.9, s_n)),
        ("multi_exit_ce s[K,N] bf16", ops.multi_exit_ce.default,
         ([z.detach().bfloat16().requires_grad_() for z in heads], target, w, -100, 0.0, None, 0.9, s_kn)),
        ("multi_exit_ce learnable w", ops.multi_exit_ce.default,
         (d, target, w.clone().requires_grad_(), -100, 0.0, None, 0.9, s_n.clone().requires_grad_())),
        *[(f"_forward mode {m}", ops._multi_exit_ce_forward.default, (d, target, w, s_kn, -100, 0.1, ema.clone(), 0.9, m))
          for m in (0, 1, 2, 3)],
        ("_forward mode 4 fp16", ops._multi_exit_ce_forward.default,
         ([z.half() for z in d], target, w, s_kn, -100, 0.1, None, 0.9, 4)),
        ("_scale_ fp16", ops._multi_exit_ce_scale_.default, (torch.randn(3, 5, 7).half(), torch.tensor(2.0 ** -20))),
        ("_backward", ops._multi_exit_ce_backward.default, (torch.tensor(-3.0), d, target, w, s_n, lse, -100, 0.1)),
        ("_scale_", ops._multi_exit_ce_scale_.default, (torch.randn(3, 5, 7), torch.tensor(4.0))),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck_every_op_and_argument(case):
    _, op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compiled_step_with_sample_weights_and_scaled_backward(dtype):
    """torch.compile of a model's forward through the op (fake kernels of the new backend ops,
    the deferred fp16 backward, grad_out != 1) matches eager."""
    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(6, 9) for _ in range(2)])
    x, y = torch.randn(8, 6), torch.randint(0, 9, (8,))
    s = torch.rand(2, 8) + 0.5

    def forward(inp):
        return multi_exit_cross_entropy([head(inp).to(dtype) for head in model], y, sample_weights=s).loss

    results = []
    for fn in (forward, torch.compile(forward, dynamic=False)):
        model.zero_grad(set_to_none=True)
        loss = fn(x)
        (loss * 8.0).backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-5)
