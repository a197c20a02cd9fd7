"""The fused linear + multi-exit cross-entropy (C++ CPU kernel / Triton on CUDA, C++
autograd) against F.linear + F.cross_entropy per exit (float64 truth): forward, gradients
w.r.t. hidden, weight, bias, exit weights and per-token weights, side outputs, edge cases,
low precision, bad input, torch.library / torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ann_kernels import multi_exit_linear_cross_entropy as fused
from ann_kernels import multi_exit_linear_cross_entropy_reference as reference
from tests.utils import DEVICES, low_precision_bound, max_abs_err, peak_allocated_bytes, profiled_ops, requires_ext

pytestmark = requires_ext


def make_case(K, N, H, V, *, device="cpu", dtype=torch.float32, per_exit_head=False, bias=False, seed=0,
              ignore_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(N, H, generator=gen).to(device, dtype).requires_grad_() for _ in range(K)]
    shape = (K, V, H) if per_exit_head else (V, H)
    weight = (torch.randn(shape, generator=gen) / H**0.5 * 2).to(device, dtype).requires_grad_()
    b = None
    if bias:
        b = torch.randn((K, V) if per_exit_head else (V,), generator=gen).to(device, dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen)
    if ignore_frac:
        target[torch.rand(N, generator=gen) < ignore_frac] = -100
    return hidden, weight, b, target.to(device)


def leaves(hidden, weight, bias, weights=None, sample_weights=None):
    out = [*hidden, weight]
    for t in (bias, weights, sample_weights):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out.append(t)
    return out


def check(hidden, weight, bias, target, weights=None, *, grad_out=1.0, atol=2e-5, grad_rtol=1e-4, **kw):
    """Fused vs float64 reference: every output and every gradient. Gradients entry by
    entry: |g - r| <= grad_rtol |r| + 1e-6 max|r| (a relative tolerance with a tiny
    absolute floor, so a wrong small entry, e.g. an off-by-one at a vocabulary tile
    boundary or a dropped label-smoothing term, fails)."""
    out = fused(hidden, weight, target, weights, bias=bias, **kw)
    ins = leaves(hidden, weight, bias, weights, kw.get("sample_weights"))
    grads = torch.autograd.grad(out.loss * grad_out, ins)
    ref = reference(hidden, weight, target, weights, bias=bias, dtype=torch.float64, **kw)
    ref_grads = torch.autograd.grad(ref.loss * grad_out, ins)
    scale = max(1.0, abs(ref.loss.item()))
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert max_abs_err(out.loss, ref.loss) <= atol * scale
    torch.testing.assert_close(out.per_exit, ref.per_exit, atol=atol * scale, rtol=0, equal_nan=True)
    torch.testing.assert_close(out.per_sample, ref.per_sample, atol=atol * max(1.0, ref.per_sample.abs().max().item()),
                               rtol=0)
    torch.testing.assert_close(out.confidence, ref.confidence, atol=1e-5, rtol=0, equal_nan=True)
    assert torch.equal(out.prediction, ref.prediction)
    for g, r, x in zip(grads, ref_grads, ins):
        assert g.dtype == x.dtype and g.shape == x.shape
        floor = 1e-6 * max(r.abs().max().item(), 1e-30 * abs(grad_out))
        torch.testing.assert_close(g.double(), r.double(), rtol=grad_rtol, atol=floor, msg=lambda m: f"{x.shape}: {m}")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("per_exit_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, K, per_exit_head, bias):
    hidden, weight, b, target = make_case(K, 23, 16, 97, device=device, per_exit_head=per_exit_head, bias=bias,
                                          seed=K, ignore_frac=0.2)
    weights = torch.rand(K, generator=torch.Generator().manual_seed(3)).to(device) + 0.1
    check(hidden, weight, b, target, weights, label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget_mb", [None, 0.002, 0.03])
def test_vocab_tiles_and_row_chunks(device, budget_mb):
    """A tiny budget forces vocabulary tiles (two passes) and many row chunks."""
    hidden, weight, b, target = make_case(3, 70, 8, 501, device=device, bias=True, seed=5, ignore_frac=0.1)
    check(hidden, weight, b, target, torch.tensor([0.2, 0.0, 1.0], device=device), memory_budget_mb=budget_mb,
          z_loss=1e-3, label_smoothing=0.05, skip_zero_weight_exits=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [32001, 50257])
def test_vocab_not_a_multiple_of_any_tile(device, V):
    hidden, weight, b, target = make_case(2, 3, 4, V, device=device, bias=True, seed=V)
    for budget in (None, 0.25):
        check(hidden, weight, b, target, torch.tensor([0.5, 1.0], device=device), memory_budget_mb=budget, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_z_loss_and_label_smoothing(device):
    hidden, weight, b, target = make_case(2, 17, 8, 64, device=device, seed=9)
    for z, e in [(1e-4, 0.0), (0.01, 0.3), (0.0, 1.0)]:
        check(hidden, weight, b, target, z_loss=z, label_smoothing=e)
    # z-loss adds exactly z * lse^2 per token to the plain cross-entropy.
    logits = F.linear(hidden[0].detach().double(), weight.detach().double())
    ce = F.cross_entropy(logits, target, reduction="none")
    out = fused(hidden, weight, target, z_loss=0.01)
    torch.testing.assert_close(out.per_sample[0].double(), ce + 0.01 * logits.logsumexp(-1) ** 2, atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_gives_zero_loss_and_gradient(device):
    hidden, weight, b, target = make_case(2, 5, 4, 11, device=device, bias=True)
    target = torch.full_like(target, -100)
    out = check(hidden, weight, b, target, label_smoothing=0.2, z_loss=0.1)
    assert out.loss.item() == 0.0 and torch.all(out.per_sample == 0)
    grads = torch.autograd.grad(fused(hidden, weight, target, bias=b).loss, [*hidden, weight, b])
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ["N", "KN"])
def test_sample_weights_and_learnable_exit_weights(device, shape):
    K, N = 3, 19
    hidden, weight, b, target = make_case(K, N, 8, 50, device=device, bias=True, seed=11, ignore_frac=0.2)
    gen = torch.Generator().manual_seed(4)
    s = torch.rand((N,) if shape == "N" else (K, N), generator=gen).to(device).requires_grad_()
    w = (torch.rand(K, generator=gen) + 0.2).to(device).requires_grad_()
    out = check(hidden, weight, b, target, w, sample_weights=s, label_smoothing=0.1)
    # dloss/dw_k = L_k (the s-weighted per-exit mean); dloss/ds_ik = w_k l_ik / N_valid.
    gw, gs = torch.autograd.grad(fused(hidden, weight, target, w, bias=b, sample_weights=s,
                                       label_smoothing=0.1).loss, [w, s])
    torch.testing.assert_close(gw, out.per_exit, atol=1e-6, rtol=0)
    n_valid = (target != -100).sum()
    expect = w.detach()[:, None] * out.per_sample / n_valid
    torch.testing.assert_close(gs, expect.sum(0) if shape == "N" else expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_out", [65536.0, 1 / 8, -3.0])
def test_any_grad_out(device, grad_out):
    """GradScaler's 2^16, loss / accumulation_steps: every gradient scales exactly."""
    hidden, weight, b, target = make_case(2, 9, 8, 40, device=device, bias=True, seed=2)
    check(hidden, weight, b, target, torch.tensor([0.4, 1.0], device=device), grad_out=grad_out, z_loss=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weight_exits_are_skipped(device):
    hidden, weight, b, target = make_case(3, 9, 8, 40, device=device, seed=6)
    out = fused(hidden, weight, target, [0.0, 0.5, 1.0])
    assert torch.isnan(out.per_exit[0]) and torch.all(out.prediction[0] == -1)
    assert torch.isnan(out.confidence[0]).all() and torch.all(out.per_sample[0] == 0)
    g = torch.autograd.grad(out.loss, hidden)
    assert torch.all(g[0] == 0)
    full = fused(hidden, weight, target, [0.0, 0.5, 1.0], skip_zero_weight_exits=False)
    torch.testing.assert_close(out.loss, full.loss)
    torch.testing.assert_close(out.per_exit[1:], full.per_exit[1:])
    assert torch.isfinite(full.per_exit).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_out", [1.0, 2.0**16, 1 / 8, -3.0])
@pytest.mark.parametrize("budget_mb", [None, 0.004])
def test_low_precision_within_twice_torchs_error(device, dtype, grad_out, budget_mb):
    """flash-attention's rule on every output and gradient: error vs an fp64 truth (on the
    same rounded inputs) <= 2x torch's own error at that dtype (F.linear + F.cross_entropy),
    for GradScaler's 2^16, accumulation's 1/8 and a negative, non-power-of-two grad_out;
    budgets: one chunk of the whole vocabulary, and three chunks x ten vocabulary
    tiles (every accumulation path)."""
    K, N, H, V = 2, 80, 32, 300
    hidden32, weight32, b32, target = make_case(K, N, H, V, device=device, bias=True, seed=8, ignore_frac=0.1)
    hidden = [h.detach().to(dtype).requires_grad_() for h in hidden32]
    weight = weight32.detach().to(dtype).requires_grad_()
    b = b32.detach().to(dtype).requires_grad_()
    w = torch.tensor([0.5, 1.0], device=device)
    ins = [*hidden, weight, b]
    kw = dict(bias=b, label_smoothing=0.1)
    out = fused(hidden, weight, target, w, memory_budget_mb=budget_mb, **kw)
    grads = torch.autograd.grad(out.loss * grad_out, ins)
    tl = reference(hidden, weight, target, w, **kw)  # torch at the same dtype
    tgrads = torch.autograd.grad(tl.loss * grad_out, ins)
    truth = reference(hidden, weight, target, w, dtype=torch.float64, **kw)
    truth_grads = torch.autograd.grad(truth.loss * grad_out, ins)
    err, bound = low_precision_bound(out.loss, tl.loss, truth.loss)
    assert err <= bound
    for g, tg, r in zip(grads, tgrads, truth_grads):
        assert g.dtype == dtype
        err, bound = low_precision_bound(g, tg, r, floor=1e-9 * abs(grad_out))
        assert err <= bound, (tuple(g.shape), err, bound)


def test_fp16_grad_scaler_keeps_gradients_below_fp16s_normal_range():
    """GradScaler's reason to exist: with many tokens and a large vocabulary the unscaled
    softmax gradients (~ 1 / (N V)) are fp16 subnormals, so grad_out = 2^16 must be applied
    before the one rounding to fp16 (as torch does), not to an fp16 gradient afterwards."""
    K, N, H, V = 1, 512, 16, 2048
    hidden32, weight32, _, target = make_case(K, N, H, V, seed=21)
    hidden = [h.detach().half().requires_grad_() for h in hidden32]
    weight = weight32.detach().half().requires_grad_()
    grads = torch.autograd.grad(fused(hidden, weight, target).loss * 2.0**16, [*hidden, weight])
    tgrads = torch.autograd.grad(reference(hidden, weight, target).loss * 2.0**16, [*hidden, weight])
    truth = torch.autograd.grad(reference(hidden, weight, target, dtype=torch.float64).loss * 2.0**16,
                                [*hidden, weight])
    for g, tg, r in zip(grads, tgrads, truth):
        err, bound = low_precision_bound(g, tg, r)
        assert err <= bound, (tuple(g.shape), err, bound)
        # Entry by entry (the small entries are the ones an fp16 subnormal would lose): the
        # mean relative error within 2x torch's (measured 1.0-1.1x; 4.9-11x when grad_out
        # is applied to the fp16 gradient after its rounding).
        def mean_rel(x):
            return ((x.double() - r.double()).abs() / r.double().abs().clamp_min(1e-30)).mean().item()

        assert mean_rel(g) <= 2 * mean_rel(tg), (tuple(g.shape), mean_rel(g), mean_rel(tg))


def _logits_gemm_rows(events, H, V) -> int:
    """Rows of the logits GEMMs (h [R, H] @ W^T [H, V]) among profiled aten::mm / addmm."""
    rows = 0
    for e in events:
        shapes = e.shapes()
        if e.name() == "aten::mm" and list(shapes[1]) == [H, V]:
            rows += shapes[0][0]
        elif e.name() == "aten::addmm" and list(shapes[2]) == [H, V]:
            rows += shapes[1][0]
    return rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_call_issues_low_precision_gemms(dtype):
    """A bf16 / fp16 call runs every GEMM in that dtype (logits, grad_h, grad_W: ATen ->
    oneDNN / MKL low-precision GEMMs) and never copies W to fp32."""
    K, N, H, V = 2, 40, 16, 500
    hidden, weight, b, target = make_case(K, N, H, V, dtype=dtype, seed=3)

    def step():
        fused(hidden, weight, target, [0.5, 1.0]).loss.backward()  # one tile of the whole vocabulary
        fused(hidden, weight, target, [0.5, 1.0], memory_budget_mb=0.02).loss.backward()  # vocabulary tiles

    events = profiled_ops(step)
    gemms = [e for e in events if e.name() in ("aten::mm", "aten::addmm", "aten::addmm_")]
    assert len(gemms) >= 3
    want = str(dtype).replace("torch.", "")
    names = {"bfloat16": "c10::BFloat16", "float16": "c10::Half"}
    for e in gemms:
        assert all(d == names[want] for d in e.dtypes() if d not in ("", "Scalar")), (e.name(), e.dtypes())
    assert _logits_gemm_rows(events, H, V) == K * N
    for e in events:  # no [V, H] tensor converted to another dtype
        if e.name() in ("aten::_to_copy", "aten::to", "aten::copy_"):
            assert [V, H] not in [list(x) for x in e.shapes()], (e.name(), e.shapes())


def test_zero_weight_exits_skip_their_gemm():
    """An exit with a host-known weight of exactly 0 costs no GEMM rows: the logits GEMMs
    cover (active exits) x N rows, counted with torch.profiler."""
    K, N, H, V = 3, 30, 8, 64
    hidden, weight, b, target = make_case(K, N, H, V, seed=6)
    for weights, active in (([1.0, 1.0, 1.0], 3), ([0.0, 0.5, 1.0], 2), ([0.0, 0.0, 2.0], 1)):
        events = profiled_ops(lambda: fused(hidden, weight, target, weights).loss.backward())
        assert _logits_gemm_rows(events, H, V) == active * N, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunks_have_equal_sizes(dtype):
    """The rows of one call go in chunks of equal size (within one row): a short last chunk
    would cost a whole pass over W and grad_W for a few rows. 200 rows, a budget of 70 rows
    of the vocabulary: 67 + 67 + 66 (not 70 + 70 + 60)."""
    K, N, H, V = 2, 100, 8, 64
    hidden, weight, b, target = make_case(K, N, H, V, dtype=dtype, seed=7)
    budget_mb = 70 * V * weight.element_size() / 2**20
    events = profiled_ops(lambda: fused(hidden, weight, target, memory_budget_mb=budget_mb).loss.backward())
    rows = [e.shapes()[0][0] for e in events if e.name() == "aten::mm" and list(e.shapes()[1]) == [H, V]]
    assert sorted(rows) == [66, 67, 67]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_within_target(device, dtype):
    """The memory bound as a test, on the allocator's own records: the extra peak of
    forward + backward beyond the .grad buffers is the logits tile of the budget plus small
    row buffers, <= 0.15x the K x N x V logits in the input dtype (eager torch holds 1x+)."""
    K, N, H, V = 4, 256, 64, 8192
    hidden, weight, b, target = make_case(K, N, H, V, device=device, dtype=dtype, seed=1)
    logits_bytes = K * N * V * weight.element_size()
    grads_bytes = sum(t.numel() * t.element_size() for t in (*hidden, weight))

    def step():
        fused(hidden, weight, target, [0.5, 0.5, 1.0, 1.0], memory_budget_mb=1).loss.backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_allocated_bytes(step)
    assert peak - grads_bytes <= 0.15 * logits_bytes, (peak, grads_bytes, logits_bytes)
    assert peak >= grads_bytes  # the counters saw the .grad buffers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hidden_rows_give_nan_and_leave_the_ema(device, dtype, bad):
    """A non-finite hidden row makes its exit's loss NaN (as F.linear + F.cross_entropy do)
    and the AdaLoss EMA skips that exit; the other exit is exact and updates its EMA."""
    hidden, weight, b, target = make_case(2, 9, 8, 40, device=device, dtype=dtype, seed=3)
    with torch.no_grad():
        hidden[0][1, 3] = bad
    ema = torch.tensor([1.0, 2.0], device=device)
    out = fused(hidden, weight, target, ema=ema, momentum=0.9)
    ref = reference(hidden, weight, target, dtype=torch.float64)
    assert torch.isnan(out.per_exit[0]) and torch.isnan(out.loss)
    assert torch.isnan(out.per_sample[0, 1]) and torch.isfinite(out.per_sample[0, 2:]).all()
    torch.testing.assert_close(out.per_exit[1].double(), ref.per_exit[1].double(), rtol=1e-2, atol=0)
    assert ema[0].item() == 1.0
    torch.testing.assert_close(ema[1].item(), 0.9 * 2.0 + 0.1 * out.per_exit[1].item(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ema_two_steps_against_a_hand_formula(device):
    """AdaLoss EMA from a finite start over two steps: e1 = m e0 + (1-m) L1,
    e2 = m e1 + (1-m) L2, with L from the float64 reference (not the op's own helper)."""
    m, e0 = 0.8, [2.0, 3.0]
    ema = torch.tensor(e0, device=device)
    expect = list(e0)
    for seed in (1, 2):
        hidden, weight, b, target = make_case(2, 9, 8, 40, device=device, bias=True, seed=seed, ignore_frac=0.2)
        fused(hidden, weight, target, [0.5, 1.0], bias=b, ema=ema, momentum=m)
        truth = reference(hidden, weight, target, [0.5, 1.0], bias=b, dtype=torch.float64).per_exit.tolist()
        expect = [m * e + (1 - m) * t for e, t in zip(expect, truth)]
        torch.testing.assert_close(ema.double().cpu(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_and_strided_hidden(device):
    K, N, H, V = 3, 10, 8, 33
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(N, K, 2 * H, generator=gen).to(device)
    stacked = base[:, :, ::2].permute(1, 0, 2).requires_grad_()  # [K, N, H], non-contiguous leaf view
    weight = torch.randn(V, H, generator=gen).to(device).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen).to(device)
    out = fused(stacked, weight, target)
    g = torch.autograd.grad(out.loss, [stacked, weight])
    dense = stacked.detach().contiguous().requires_grad_()
    ref = reference(dense, weight, target, dtype=torch.float64)
    want = torch.autograd.grad(ref.loss, [dense, weight])
    torch.testing.assert_close(out.loss.double(), ref.loss, atol=1e-5, rtol=0)
    assert g[0].shape == stacked.shape
    for got, w in zip(g, want):
        torch.testing.assert_close(got.double(), w.double(), rtol=1e-4, atol=1e-6 * w.abs().max().item())


def test_ema_update_and_inference_mode():
    hidden, weight, b, target = make_case(2, 9, 8, 40, seed=3)
    ema = torch.full((2,), float("nan"))
    out = fused(hidden, weight, target, ema=ema, momentum=0.9)
    torch.testing.assert_close(ema, out.per_exit)
    with torch.inference_mode():
        out2 = fused([h.detach() for h in hidden], weight.detach(), target, ema=ema, momentum=0.9)
    torch.testing.assert_close(ema, 0.9 * out.per_exit + 0.1 * out2.per_exit)
    assert not out2.loss.requires_grad


def test_retain_graph_second_backward_and_accumulation():
    hidden, weight, b, target = make_case(2, 9, 8, 40, bias=True, seed=4)
    loss = fused(hidden, weight, target, bias=b).loss
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (*hidden, weight, b)]
    loss.backward()  # buffers were handed over: recomputed
    for t, g in zip((*hidden, weight, b), first):
        torch.testing.assert_close(t.grad, 2 * g)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    hidden, weight, b, target = make_case(2, 5, 8, 20, device=device)
    with pytest.raises(ValueError, match="hidden width H = 8 but weight has width 7"):
        fused(hidden, torch.randn(20, 7, device=device), target)
    with pytest.raises(ValueError, match="bias: expected shape"):
        fused(hidden, weight, target, bias=torch.randn(19, device=device))
    with pytest.raises(ValueError, match=r"target\[1\] = 20 is out of range"):
        fused(hidden, weight, torch.tensor([0, 20, 1, 2, 3], device=device))
    with pytest.raises(TypeError, match="target: expected int64"):
        fused(hidden, weight, target.float())
    with pytest.raises(ValueError, match="per-exit head .* needs K = 2"):
        fused(hidden, torch.randn(3, 20, 8, device=device), target)
    with pytest.raises(ValueError, match="weights: expected 2 values"):
        fused(hidden, weight, target, torch.ones(3, device=device))
    with pytest.raises(ValueError, match="sample_weights: expected shape"):
        fused(hidden, weight, target, sample_weights=torch.ones(4, device=device))
    with pytest.raises((TypeError, RuntimeError), match="weight has dtype"):
        fused(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="z_loss"):
        fused(hidden, weight, target, z_loss=-1.0)


def test_weight_values_follow_the_logits_ops_rule():
    """One rule for weight values on both loss ops (csrc/cpu/weight_checks.h): NaN exit or
    sample weights and negative exit weights are rejected on CPU; negative sample weights
    (L2W-DEN with eps > 0.5) are allowed and match the reference."""
    hidden, weight, b, target = make_case(2, 5, 8, 20)
    nan = float("nan")
    with pytest.raises(ValueError, match=r"weights: must not be NaN, got weights\[1\] = nan"):
        fused(hidden, weight, target, torch.tensor([1.0, nan]))
    with pytest.raises(ValueError, match=r"weights: must be non-negative"):
        fused(hidden, weight, target, torch.tensor([1.0, -0.5]), skip_zero_weight_exits=False)
    with pytest.raises(ValueError, match=r"sample_weights: must not be NaN, got sample_weights\[0, 2\] = nan"):
        fused(hidden, weight, target, sample_weights=torch.tensor([[1.0, 1, nan, 1, 1], [1.0] * 5]))
    s = torch.tensor([[1.0, -0.6, 2.0, 0.5, 1.0], [-0.2, 1.0, 1.0, 1.0, 2.6]])
    got = fused(hidden, weight, target, sample_weights=s).loss
    want = reference(hidden, weight, target, sample_weights=s).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opcheck():
    # (opcheck compares outputs without equal_nan, so every exit stays active here.)
    hidden, weight, b, target = make_case(2, 6, 8, 30, bias=True, seed=7)
    s = torch.rand(6, requires_grad=True)
    args = (hidden, weight, target, torch.tensor([0.5, 1.0]), b, s, -100, 0.1, 1e-3, None, 0.9, [0, 1], 0)
    torch.library.opcheck(torch.ops.ann_kernels.multi_exit_linear_ce.default, args)
    hidden, weight, b, target = make_case(2, 6, 8, 30, bias=True, per_exit_head=True, seed=8)
    s = torch.rand(2, 6, requires_grad=True)
    w = torch.tensor([0.5, 1.0], requires_grad=True)
    args = (hidden, weight, target, w, b, s, -100, 0.0, 0.0, torch.zeros(2), 0.9, [0, 1], 1024)
    torch.library.opcheck(torch.ops.ann_kernels.multi_exit_linear_ce.default, args)
    torch.library.opcheck(torch.ops.ann_kernels.multi_exit_linear_ce_fwd.default,
                          ([h.detach() for h in hidden], weight.detach(), target, torch.tensor([0.5, 1.0]),
                           b.detach(), None, -100, 0.0, 0.0, None, 0.9, [0, 1], 0, True))


def test_inside_torch_compile_fullgraph():
    torch._dynamo.reset()
    N, H, V = 8, 16, 40
    torch.manual_seed(0)
    body = torch.nn.Linear(H, H)
    head = torch.nn.Linear(H, V)
    x = torch.randn(N, H)
    target = torch.randint(0, V, (N,))

    def step(x):
        h1 = torch.tanh(body(x))
        h2 = torch.tanh(body(h1))
        return fused([h1, h2], head.weight, target, torch.tensor([0.3, 1.0]), bias=head.bias).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    got = [p.grad.clone() for p in (*body.parameters(), *head.parameters())]
    for p in (*body.parameters(), *head.parameters()):
        p.grad = None
    step(x).backward()
    want = [p.grad for p in (*body.parameters(), *head.parameters())]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_many_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    cases = [make_case(2, 7, 8, 45, bias=True, seed=s) for s in range(6)]

    def run(c):
        hidden, weight, b, target = c
        out = fused(hidden, weight, target, [0.3, 1.0], bias=b, memory_budget_mb=0.004)
        return out.loss.detach(), torch.autograd.grad(out.loss, [*hidden, weight, b])

    serial = [run(c) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, cases))
    for (l1, g1), (l2, g2) in zip(serial, parallel):
        assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_gradient_accumulation_under_autocast_and_grad_scaler():
    hidden, weight, b, target = make_case(2, 8, 8, 30, bias=True, seed=12)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for half in (slice(0, 4), slice(4, 8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the op itself runs in the input dtype
            out = fused([h[half] for h in hidden], weight, target[half], [0.5, 1.0], bias=b)
        scaler.scale(out.loss / 2).backward()
    grads = [t.grad / scaler.get_scale() for t in (*hidden, weight, b)]
    want = [torch.zeros_like(t) for t in (*hidden, weight, b)]
    for half in (slice(0, 4), slice(4, 8)):
        ref = reference([h[half] for h in hidden], weight, target[half], [0.5, 1.0], bias=b, dtype=torch.float64)
        for w, g in zip(want, torch.autograd.grad(ref.loss / 2, [*hidden, weight, b])):
            w += g.float()
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
