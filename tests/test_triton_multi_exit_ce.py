"""The Triton kernel of the fused multi-exit cross-entropy (``ann_kernels/triton/multi_exit_ce.py``)
against the pure-torch reference, run on CPU tensors by Triton's interpreter.

No GPU here: ``TRITON_INTERPRET=1`` must be set before the kernel module is imported (the
``@triton.jit`` decorator reads it), so it is set first thing below. The interpreter is
~1000x slower than a GPU: shapes are tiny, and the CPU block sizes (BLOCK_C = 16) make C = 33
run the chunked online-softmax loop. One test compiles the kernel for sm_80 / sm_90 (PTX +
ptxas, no GPU needed) in a subprocess without the interpreter.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel module are imported

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): Triton kernels untested")

from ann_kernels import multi_exit_cross_entropy_reference  # noqa: E402
from ann_kernels.triton import multi_exit_ce as tmod  # noqa: E402
from ann_kernels.triton.multi_exit_ce import multi_exit_ce_fwd_triton  # noqa: E402
from tests.utils import grads_of, low_precision_bound, make_logits, make_target, max_abs_err  # noqa: E402

if isinstance(tmod._multi_exit_ce_kernel, triton.runtime.JITFunction):  # pragma: no cover
    pytest.skip(
        "ann_kernels.triton.multi_exit_ce was imported before TRITON_INTERPRET=1 was set "
        "(run this file in its own process)",
        allow_module_level=True,
    )

NAN = float("nan")
INF = float("inf")


def run(heads, target, weights=None, *, ignore_index=-100, label_smoothing=0.0, ema=None, momentum=0.99,
        compute_grad=True, **blocks):
    """The kernel through its launcher, with the op's positional signature."""
    if weights is None:
        weights = torch.ones(len(heads))
    detached = [z.detach() for z in heads]
    return multi_exit_ce_fwd_triton(detached, target, weights, ignore_index, label_smoothing, ema, momentum,
                                    compute_grad, **blocks)


def reference(heads, target, weights=None, **kwargs):
    """(reference ExitLoss, autograd gradients of its loss w.r.t. the heads)."""
    leaves = [z.detach().clone().requires_grad_() for z in heads]
    ref = multi_exit_cross_entropy_reference(leaves, target, weights, **kwargs)
    return ref, grads_of(ref.loss, leaves)


def assert_matches_reference(heads, target, weights=None, *, atol=2e-5, grad_atol=1e-6, blocks=None,
                             **kwargs):
    """Every output of the kernel against the reference; returns the kernel's outputs."""
    out = run(heads, target, weights, **kwargs, **(blocks or {}))
    loss, per_exit, per_sample, confidence, prediction, grads = out
    ref, ref_grads = reference(heads, target, weights, **kwargs)
    num_exits, (n, c) = len(heads), heads[0].shape
    assert loss.shape == () and loss.dtype == torch.float32
    assert per_exit.shape == (num_exits,) and per_exit.dtype == torch.float32
    for t in (per_sample, confidence):
        assert t.shape == (num_exits, n) and t.dtype == torch.float32
    assert prediction.shape == (num_exits, n) and prediction.dtype == torch.int64
    assert grads.shape == (num_exits, n, c) and grads.dtype == heads[0].dtype and grads.is_contiguous()
    scale = max(1.0, ref.per_sample.abs().max().item())
    assert max_abs_err(loss, ref.loss) <= atol * max(scale, abs(ref.loss.item()))
    assert max_abs_err(per_exit, ref.per_exit) <= atol * scale
    assert max_abs_err(per_sample, ref.per_sample) <= atol * scale
    assert max_abs_err(confidence, ref.confidence) <= 1e-6
    assert torch.equal(prediction, ref.prediction)
    for k in range(num_exits):
        assert max_abs_err(grads[k].float(), ref_grads[k].float()) <= grad_atol, k
    return out


# --- shapes, ignore_index, smoothing, weights ---------------------------------------------


@pytest.mark.parametrize("num_exits", [1, 3])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("num_classes", [2, 7, 33])  # 33 > BLOCK_C = 16: three chunks
def test_matches_reference(num_exits, n, num_classes):
    heads = make_logits(num_exits, n, num_classes, seed=100 * num_exits + 10 * n + num_classes)
    target = make_target(n, num_classes, seed=n, ignore_frac=0.4 if n > 1 else 0.0)
    weights = torch.tensor([0.7, 0.0, 1.5][:num_exits])  # K = 3: a zero weight
    smoothing = 0.1 if num_classes != 7 else 0.0
    assert_matches_reference(heads, target, weights, label_smoothing=smoothing)


@pytest.mark.parametrize(
    "blocks", [dict(block_n=2, block_c=4), dict(block_n=1, block_c=2), dict(block_n=8, block_c=8)]
)
@pytest.mark.parametrize("num_classes", [7, 33])
def test_many_programs_and_chunks(blocks, num_classes):
    """Several row blocks per exit (the last block partly past N) and several chunks: the
    per-exit atomic sums and the last-program ticket across up to 15 programs."""
    heads = make_logits(3, 5, num_classes, seed=num_classes)
    target = make_target(5, num_classes, seed=3, ignore_frac=0.3, ignore_index=-1)
    weights = torch.tensor([0.3, 1.0, 2.0])
    assert_matches_reference(heads, target, weights, ignore_index=-1, label_smoothing=0.25, blocks=blocks)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_rows_ignored(label_smoothing):
    heads = make_logits(3, 5, 33, seed=4)
    target = torch.full((5,), -100)
    loss, per_exit, per_sample, confidence, _, grads = assert_matches_reference(
        heads, target, label_smoothing=label_smoothing
    )
    assert loss.item() == 0.0 and torch.all(per_exit == 0) and torch.all(per_sample == 0)
    assert torch.all(grads == 0)
    assert torch.isfinite(confidence).all()


def test_zero_weights_give_exact_zero_gradients():
    heads = make_logits(3, 5, 33, seed=5)
    target = make_target(5, 33, seed=6)
    weights = torch.tensor([0.0, 1.0, 0.0])
    loss, per_exit, *_, grads = assert_matches_reference(heads, target, weights, label_smoothing=0.1)
    assert torch.all(grads[0] == 0) and torch.all(grads[2] == 0) and grads[1].abs().sum() > 0
    assert torch.all(per_exit > 0)  # per-exit losses are reported whatever the weight
    torch.testing.assert_close(loss, per_exit[1])


def test_label_smoothing_one_and_equals_weighted_cross_entropy():
    heads = make_logits(2, 5, 33, seed=7)
    target = make_target(5, 33, seed=8, ignore_frac=0.3)
    assert_matches_reference(heads, target, label_smoothing=1.0)
    weights = torch.tensor([0.5, 2.0])
    loss = run(heads, target, weights, label_smoothing=0.05)[0]
    expected = sum(w * F.cross_entropy(z, target, label_smoothing=0.05) for w, z in zip(weights, heads))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)


def test_compute_grad_false():
    heads = make_logits(3, 5, 33, seed=9)
    target = make_target(5, 33, seed=10)
    with_grad = run(heads, target, label_smoothing=0.1)
    without = run(heads, target, label_smoothing=0.1, compute_grad=False)
    for a, b in zip(with_grad[:5], without[:5]):
        assert torch.equal(a, b)
    assert without[5].shape == (0,) and without[5].dtype == torch.float32


# --- dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_classes", [7, 33])
def test_low_precision(dtype, num_classes):
    heads = make_logits(3, 5, num_classes, dtype, seed=11)
    target = make_target(5, num_classes, seed=12, ignore_frac=0.2)
    weights = torch.tensor([1.0, 0.5, 2.0])
    out = run(heads, target, weights, label_smoothing=0.1)
    loss, per_exit, per_sample, confidence, prediction, grads = out
    # The forward math is fp32 on the same (rounded) inputs: fp32 tolerances.
    truth, truth_grads = reference([z.float() for z in heads], target, weights, label_smoothing=0.1)
    torch.testing.assert_close(loss, truth.loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_exit, truth.per_exit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sample, truth.per_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(confidence, truth.confidence, rtol=0, atol=1e-6)
    assert torch.equal(prediction, truth.prediction)
    # Gradients are rounded once to the input dtype: at most twice torch's own error there.
    leaves = [z.detach().clone().requires_grad_() for z in heads]
    torch_lp = sum(w * F.cross_entropy(z, target, label_smoothing=0.1) for w, z in zip(weights, leaves))
    torch_grads = grads_of(torch_lp, leaves)
    assert grads.dtype == dtype
    for g, t, r in zip(grads, torch_grads, truth_grads):
        err, bound = low_precision_bound(g.float(), t.float(), r)
        assert err <= bound, (err, bound)


# --- layouts ----------------------------------------------------------------------------


def test_non_contiguous_and_views_of_one_tensor():
    gen = torch.Generator().manual_seed(13)
    target = make_target(5, 17, seed=14, ignore_frac=0.2)
    wide = torch.randn(5, 40, generator=gen)
    transposed = torch.randn(17, 5, generator=gen)
    stacked = torch.randn(2, 5, 17, generator=gen)
    heads = [wide[:, 3:20], transposed.t(), stacked[0], stacked[1]]
    assert not heads[0].is_contiguous() and not heads[1].is_contiguous()
    assert tmod._common_alignment(heads[:1]) == 4  # column 3 of fp32 rows: 4-byte aligned only
    before = [z.clone() for z in heads]
    assert_matches_reference(heads, target, label_smoothing=0.1)
    for z, b in zip(heads, before):  # the caller's logits are never written
        assert torch.equal(z, b)
    # A single row: any row stride.
    row = torch.randn(3, 50, generator=gen)[1:2, 5:38]
    assert_matches_reference([row, row * 2], make_target(1, 33, seed=15))


def test_common_alignment():
    f32 = torch.zeros(4, 32)
    assert tmod._common_alignment([f32, f32[:, :8]]) == 16
    assert tmod._common_alignment([f32[:, 1:9]]) == 4
    assert tmod._common_alignment([torch.zeros(4, 10)]) == 8  # row stride 40 bytes
    assert tmod._common_alignment([torch.zeros(4, 7, dtype=torch.bfloat16)]) == 2
    assert tmod._common_alignment([torch.zeros(1, 7, dtype=torch.bfloat16)]) == 16  # one row: stride unused


# --- side outputs, extreme and non-finite values ------------------------------------------


def test_argmax_ties_take_the_first_index_within_and_across_chunks():
    heads = make_logits(1, 3, 33, seed=16, scale=1.0)
    z = heads[0].detach()
    z[0, 1] = z[0, 2] = 9.0  # tie inside a chunk
    z[1, 3] = z[1, 20] = z[1, 32] = 9.0  # tie across chunks 0, 1 and 2 (BLOCK_C = 16)
    z[2, 30] = 9.0  # the maximum in the last, partial chunk
    out = assert_matches_reference([z], make_target(3, 33, seed=17))
    assert out[4][0].tolist() == [1, 3, 30]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits(dtype):
    heads = make_logits(2, 5, 33, seed=18, scale=1.0)
    gen = torch.Generator().manual_seed(19)
    for z in heads:
        sign = torch.where(torch.rand(z.shape, generator=gen) < 0.5, -1.0, 1.0)
        z.data = (1e4 * sign).to(dtype)
    heads[0].data[1, 0] = 1e4 - 16  # near-ties at large magnitude
    target = make_target(5, 33, seed=20)
    out = assert_matches_reference(heads, target, torch.tensor([1.0, 0.5]), atol=1e-4, grad_atol=2e-3,
                                   label_smoothing=0.1)
    assert all(torch.isfinite(t).all() for t in out[:4]) and torch.isfinite(out[5]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on discarded lanes
def test_minus_inf_logits_masked_vocabulary():
    """A whole first chunk of -inf (masked classes) must not poison the online softmax."""
    heads = make_logits(2, 4, 33, seed=21)
    for z in heads:
        z.data[:, :16] = -INF
        z.data[3, 16:] = -INF
        z.data[3, 32] = 0.5  # row 3: a single finite class, in the last chunk
    target = torch.tensor([16, 20, -100, 32])
    out = assert_matches_reference(heads, target)
    assert all(torch.isfinite(t).all() for t in out[:4]) and torch.isfinite(out[5]).all()
    assert out[3][:, 3].tolist() == [1.0, 1.0] and out[4][:, 3].tolist() == [32, 32]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on discarded lanes
def test_out_of_range_target_poisons_its_row_only():
    """No host sync means no exception: a valid target outside [0, C) gives NaN for its row."""
    heads = make_logits(2, 4, 7, seed=22)
    target = torch.tensor([0, 7, -100, -3])
    ema = torch.tensor([1.0, 2.0])
    loss, per_exit, per_sample, confidence, _, grads = run(heads, target, ema=ema)
    assert per_sample[:, 1].isnan().all() and per_sample[:, 3].isnan().all()
    assert per_sample[:, 0].isfinite().all() and torch.all(per_sample[:, 2] == 0)
    assert grads[:, 1].isnan().all() and grads[:, 0].isfinite().all() and torch.all(grads[:, 2] == 0)
    assert per_exit.isnan().all() and loss.isnan()
    assert ema.tolist() == [1.0, 2.0]  # non-finite L_k never enter the state
    assert confidence.isfinite().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on discarded lanes
def test_rows_without_gradient_stay_exactly_zero_next_to_inf():
    """As the C++ kernel: scale w_k / N_valid = 0 (zero weight, ignored row) writes exact zeros,
    even where softmax is NaN (autograd of the reference would give 0 * NaN = NaN there)."""
    heads = make_logits(2, 4, 33, seed=29)
    target = torch.tensor([3, -100, 20, 32])
    heads[0].data[0, 5] = INF  # exit 0 has weight 0
    heads[1].data[1, 17] = INF  # row 1 is ignored
    loss, per_exit, per_sample, *_, grads = run(heads, target, torch.tensor([0.0, 1.0]))
    assert torch.all(grads[0] == 0) and torch.all(grads[1, 1] == 0)
    assert torch.isfinite(grads).all() and grads[1].abs().sum() > 0
    ref, ref_grads = reference([heads[1]], target)
    torch.testing.assert_close(per_exit[1], ref.per_exit[0])
    torch.testing.assert_close(grads[1, [0, 2, 3]], ref_grads[0][[0, 2, 3]])
    assert not torch.isfinite(per_exit[0]) and per_sample[1, 1].item() == 0.0


# --- the AdaLoss running average -----------------------------------------------------------


def test_ema_matches_reference_over_steps():
    heads = make_logits(3, 5, 33, seed=23)
    target = make_target(5, 33, seed=24, ignore_frac=0.2)
    ema = torch.tensor([NAN, 1.0, NAN])
    ema_ref = ema.clone()
    for step in range(2):
        heads_step = [z * (1 + step) for z in heads]
        out = run(heads_step, target, ema=ema, momentum=0.9)
        ref, _ = reference(heads_step, target, ema=ema_ref, momentum=0.9)
        torch.testing.assert_close(ema, ema_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1], ref.per_exit, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ema).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on discarded lanes
def test_ema_first_step_and_non_finite_exit():
    heads = make_logits(3, 5, 7, seed=25)
    target = make_target(5, 7, seed=26)
    ema = torch.tensor([NAN, 2.0, 3.0])
    heads[2].data[0, 0] = INF  # exit 2: non-finite L_2
    loss, per_exit, *_ = run(heads, target, ema=ema, momentum=0.8)
    assert not torch.isfinite(per_exit[2]) and torch.isfinite(per_exit[:2]).all()
    assert ema[0].item() == per_exit[0].item()  # NaN = unset takes the first finite L_k
    torch.testing.assert_close(ema[1], 0.8 * 2.0 + 0.2 * per_exit[1])
    assert ema[2].item() == 3.0  # unchanged
    # Also a NaN state with a non-finite loss stays NaN (still unset).
    ema = torch.tensor([NAN, NAN, NAN])
    run(heads, target, ema=ema)
    assert torch.isfinite(ema[:2]).all() and ema[2].isnan()


def test_ema_strided_view_updated_in_place():
    heads = make_logits(2, 5, 7, seed=27)
    target = make_target(5, 7, seed=28)
    buf = torch.tensor([NAN, -1.0, 4.0, -1.0])
    ema = buf[::2]  # stride 2
    out = run(heads, target, ema=ema, momentum=0.5)
    assert buf[0].item() == out[1][0].item()
    torch.testing.assert_close(buf[2], 0.5 * 4.0 + 0.5 * out[1][1])
    assert buf[1].item() == -1.0 and buf[3].item() == -1.0


# --- fuzz --------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    num_exits=st.integers(1, 4),
    n=st.integers(1, 6),
    num_classes=st.integers(1, 40),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    scale=st.sampled_from([0.1, 3.0, 50.0]),
    blocks=st.sampled_from([{}, dict(block_n=2, block_c=4), dict(block_n=1, block_c=8)]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(num_exits, n, num_classes, smoothing, ignore_frac, scale, blocks, seed):
    heads = make_logits(num_exits, n, num_classes, scale=scale, seed=seed)
    target = make_target(n, num_classes, seed=seed + 1, ignore_frac=ignore_frac)
    weights = torch.rand(num_exits, generator=torch.Generator().manual_seed(seed))
    assert_matches_reference(heads, target, weights, label_smoothing=smoothing, atol=1e-4, grad_atol=1e-5,
                             blocks=blocks)


def test_bad_block_sizes_and_inputs():
    heads = make_logits(2, 3, 5)
    target = make_target(3, 5)
    with pytest.raises(ValueError, match="block_c: expected a power of two"):
        run(heads, target, block_c=3)
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        run([heads[0], torch.randn(3, 6)], target)
    with pytest.raises(ValueError, match="at least one exit"):
        multi_exit_ce_fwd_triton([], target, torch.ones(0), -100, 0.0, None, 0.9, True)


# --- the real compiler (no GPU needed) ----------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os, re, sys
    try:
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.backends.nvidia  # noqa: F401
    except Exception as error:  # no NVIDIA backend in this triton build
        print(f"SKIP: {error}")
        sys.exit(77)
    from ann_kernels.triton.multi_exit_ce import _multi_exit_ce_kernel as kernel
    from ann_kernels.triton.multi_exit_ce import _multi_exit_ce_bwd_kernel, _scale_grads_kernel

    ptr = {"table_ptr": "*i64", "target_ptr": "*i64", "weight_ptr": "*fp32", "n_valid_ptr": "*i64",
           "sw_ptr": "*fp32", "lse_ptr": "*fp32", "grad_pow2_ptr": "*fp32",
           "per_sample_ptr": "*fp32", "confidence_ptr": "*fp32", "prediction_ptr": "*i64",
           "sums_ptr": "*fp32", "ticket_ptr": "*i32", "per_exit_ptr": "*fp32", "loss_ptr": "*fp32",
           "ema_ptr": "*fp32"}
    scalars = {"ema_stride": "i32", "sw_stride_k": "i32", "N": "i32", "C": "i32", "K": "i32", "ignore_index": "i32",
               "label_smoothing": "fp32", "momentum": "fp32"}
    names = kernel.arg_names
    # The large-vocabulary (chunked) and the packed-rows (single chunk) layouts, each with
    # the other constexpr switches flipped.
    for arch, (dt, dt_name), bn, bc, single in [(80, (tl.bfloat16, "bf16"), 1, 4096, False),
                                               (90, (tl.float32, "fp32"), 256, 16, True)]:
        consts = dict(DTYPE=dt, BLOCK_N=bn, BLOCK_C=bc, BLOCK_K=8, ALIGN_BYTES=16, SINGLE_CHUNK=single,
                      HAS_SMOOTHING=single, COMPUTE_GRAD=True, HAS_EMA=not single, HAS_WEIGHTS=single,
                      HAS_SW=not single, SAVE_LSE=not single, GRAD_POW2=not single)
        signature = {**ptr, "grad_ptr": "*" + dt_name, **scalars, **{k: "constexpr" for k in consts}}
        assert set(signature) == set(names), set(names) ^ set(signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in [*ptr, "grad_ptr", "C"]}
        src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                        constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8))
        ptx = compiled.asm["ptx"]
        # The alignment hint works: 128-bit loads of the logits and stores of the gradient.
        accesses = sorted(set(re.findall(r"[ls][dt]\\.global[.\\w]*", ptx)))
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, accesses
        assert compiled.asm.get("cubin"), "ptxas produced no cubin"
        print(f"sm_{arch} {dt_name} BLOCK_N={bn} BLOCK_C={bc}: ok")

    # The deferred backward (bf16 / fp16 logits) and the in-place scale.
    bwd = _multi_exit_ce_bwd_kernel
    names = bwd.arg_names
    for arch, (dt, dt_name), flags in [(80, (tl.float16, "fp16"), True), (90, (tl.bfloat16, "bf16"), False)]:
        consts = dict(DTYPE=dt, BLOCK_N=1, BLOCK_C=4096, ALIGN_BYTES=16, HAS_WEIGHTS=flags, HAS_SW=not flags)
        bptr = {"table_ptr": "*i64", "target_ptr": "*i64", "weight_ptr": "*fp32", "sw_ptr": "*fp32",
                "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", "n_valid_ptr": "*i64", "grad_ptr": "*" + dt_name}
        bscalars = {"sw_stride_k": "i32", "N": "i32", "C": "i32", "K": "i32", "ignore_index": "i32",
                    "label_smoothing": "fp32"}
        signature = {**bptr, **bscalars, **{k: "constexpr" for k in consts}}
        assert set(signature) == set(names), set(names) ^ set(signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in [*bptr, "C"]}
        src = ASTSource(fn=bwd, signature=signature, attrs=attrs,
                        constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8))
        assert "st.global.v4" in compiled.asm["ptx"] and compiled.asm.get("cubin")
        print(f"sm_{arch} backward {dt_name}: ok")
    names = _scale_grads_kernel.arg_names
    src = ASTSource(fn=_scale_grads_kernel, signature={"grad_ptr": "*fp32", "grad_loss_ptr": "*fp32", "numel": "i64",
                                                      "BLOCK": "constexpr"},
                    attrs={(0,): [["tt.divisibility", 16]]}, constexprs={(names.index("BLOCK"),): 4096})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm.get("cubin")
    print("sm_90 scale: ok")
    """
)


_IMPORT_ORDER_SCRIPT = textwrap.dedent(
    """
    import os
    import triton  # noqa: F401  (first, without the interpreter: as `import ann_kernels` does)
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from ann_kernels.triton.multi_exit_ce import multi_exit_ce_fwd_triton
    out = multi_exit_ce_fwd_triton([torch.randn(3, 5)], torch.tensor([1, -100, 4]), torch.ones(1), -100, 0.1,
                                   None, 0.9, True)
    assert out[5].shape == (1, 3, 5) and bool(out[0].isfinite())
    """
)


def test_interpreter_works_when_triton_was_imported_first():
    """The kernel avoids triton's standard-library @jit functions (tl.sum, tl.max, tl.zeros),
    which the interpreter cannot run when triton was imported before TRITON_INTERPRET=1."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_compiles_for_sm80_and_sm90():
    """The interpreter accepts things the compiler rejects (and vice versa): compile the kernel
    to PTX and cubin for sm_80 and sm_90, without the interpreter, in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=240)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


# --- issue 10: sample weights, the deferred backward, in-place scale, argmax NaN rule ----

from ann_kernels.triton.multi_exit_ce import (  # noqa: E402
    multi_exit_ce_backward_triton, multi_exit_ce_forward_triton, scale_grads_triton)


@pytest.mark.parametrize("shape", ["N", "KN"])
@pytest.mark.parametrize("blocks", [{}, {"block_c": 8, "block_n": 2}])
def test_sample_weights_and_no_weights(shape, blocks):
    heads = make_logits(3, 5, 33, seed=40)
    target = make_target(5, 33, ignore_frac=0.3)
    s = torch.rand((5,) if shape == "N" else (3, 5), generator=torch.Generator().manual_seed(41)) + 0.2
    detached = [z.detach() for z in heads]
    loss, per_exit, _, _, _, lse, grads = multi_exit_ce_forward_triton(detached, target, None, s, -100, 0.1, None,
                                                                       0.9, 1, **blocks)
    leaves = [z.detach().clone().requires_grad_() for z in heads]
    ref = multi_exit_cross_entropy_reference(leaves, target, None, sample_weights=s, label_smoothing=0.1)
    ref_grads = grads_of(ref.loss, leaves)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_exit, ref.per_exit, rtol=1e-5, atol=1e-6)  # unweighted L_k
    assert lse.numel() == 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


_DEFERRED_CASES = [(dtype, grad_out, 7) for dtype in (torch.float32, torch.bfloat16, torch.float16)
                   for grad_out in (-3.0, 2.0 ** -10, 65536.0)]
_DEFERRED_CASES += [(torch.float16, 65536.0, 33), (torch.bfloat16, -3.0, 33)]  # three chunks (BLOCK_C = 16)


@pytest.mark.parametrize(("dtype", "grad_out", "num_classes"), _DEFERRED_CASES)
def test_deferred_backward_any_grad_out(dtype, grad_out, num_classes):
    """grad_out read on the device and folded into the fp32 scale before rounding (the
    fp16-GradScaler defect); error within twice torch's autocast-style error (enough rows
    that the maximum error is a statistic, not one rounding)."""
    n = 48
    heads = make_logits(2, n, num_classes, dtype, seed=42)
    target = make_target(n, num_classes, ignore_frac=0.2)
    w = torch.tensor([0.5, 2.0])
    s = torch.rand(n, generator=torch.Generator().manual_seed(43)) + 0.5
    detached = [z.detach() for z in heads]
    lse = multi_exit_ce_forward_triton(detached, target, w, s, -100, 0.1, None, 0.9, 2)[5]
    assert lse.shape == (2, n)
    grads = multi_exit_ce_backward_triton(torch.tensor(grad_out), detached, target, w, s, lse, -100, 0.1,
                                          block_c=16, block_n=16)
    leaves64 = [z.detach().double().requires_grad_() for z in heads]
    truth = grads_of(grad_out * multi_exit_cross_entropy_reference(
        [z.float() for z in leaves64], target, w, sample_weights=s, label_smoothing=0.1).loss, leaves64)
    low = [z.detach().clone().requires_grad_() for z in heads]
    theirs = grads_of(grad_out * multi_exit_cross_entropy_reference(
        low, target, w, sample_weights=s, label_smoothing=0.1).loss, low)
    for g, t, r in zip(grads, theirs, truth):
        assert g.dtype == dtype and torch.isfinite(g).all()
        if dtype == torch.bfloat16:
            # Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest
            # even), so its error is one bf16 ulp, not torch's half ulp: bound it by that.
            torch.testing.assert_close(g.double(), r, rtol=2.0 ** -7, atol=abs(grad_out) * 1e-6)
            continue
        err, bound = low_precision_bound(g.double(), t.double(), r, floor=abs(grad_out) * 1e-6)
        assert err <= bound, (err, bound)


def test_deferred_backward_nonfinite_rows_and_zero_scale():
    z = make_logits(1, 4, 33, seed=44, scale=1.0)[0].detach()
    z[0, 3] = NAN
    z[1, 20] = INF
    target = torch.tensor([1, 2, -100, 5])
    w = torch.tensor([1.0])
    lse = multi_exit_ce_forward_triton([z], target, w, None, -100, 0.0, None, 0.9, 2)[5]
    g = multi_exit_ce_backward_triton(torch.tensor(4.0), [z], target, w, None, lse, -100, 0.0)[0]
    leaf = z.clone().requires_grad_()
    expected = grads_of(4.0 * F.cross_entropy(leaf, target), [leaf])[0]
    assert g[0].isnan().all() and g[1].isnan().all()  # as torch: NaN rows
    assert expected[0].isnan().all() and expected[1].isnan().all()
    assert torch.equal(g[2], torch.zeros(33))  # ignored row: exact zeros
    torch.testing.assert_close(g[3], expected[3], rtol=1e-5, atol=1e-7)


def test_scale_kernel_skips_grad_out_one_and_scales_otherwise():
    g = torch.randn(3, 5, 7)
    g[0, 0, 0] = NAN
    before = g.clone()
    scale_grads_triton(g, torch.tensor(1.0), block=16)
    assert torch.equal(g[~g.isnan()], before[~before.isnan()]) and g[0, 0, 0].isnan()
    scale_grads_triton(g, torch.tensor(-2.5), block=16)
    torch.testing.assert_close(g, before * -2.5, equal_nan=True)


@pytest.mark.parametrize("blocks", [{}, {"block_c": 8}])
def test_argmax_follows_torch_first_nan_rule(blocks):
    z = make_logits(1, 4, 33, seed=45, scale=1.0)[0].detach()
    z[0, 5] = z[0, 2] = NAN  # two NaNs in one chunk: the first wins
    z[1, 30] = NAN
    z[1, 3] = 50.0  # a NaN in a later chunk beats a larger earlier value
    z[2, 9] = NAN
    z[2, 25] = NAN  # NaNs in two chunks
    out = multi_exit_ce_forward_triton([z], make_target(4, 33), None, None, -100, 0.0, None, 0.9, 0, **blocks)
    assert out[4][0].tolist() == z.argmax(dim=-1).tolist() == [2, 30, 9, z[3].argmax().item()]

