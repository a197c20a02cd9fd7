"""The GPU path of the fused linear + multi-exit cross-entropy
(``ann_kernels/triton/multi_exit_linear_ce.py``: torch GEMMs + the Triton row kernel) against
the float64 reference, run on CPU tensors by Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported; tiny shapes, 16-wide vocabulary blocks so V = 37 runs
several masked blocks); fp32, bf16 and fp16."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel module are imported

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): Triton kernels untested")

from ann_kernels import multi_exit_linear_cross_entropy as fused  # noqa: E402
from ann_kernels import multi_exit_linear_cross_entropy_reference as reference  # noqa: E402
from ann_kernels.triton import multi_exit_linear_ce as tmod  # noqa: E402
from tests.utils import (  # noqa: E402
    linear_ce_triton_behind_cpu_op,
    low_precision_bound,
    max_abs_err,
    profiled_ops,
)

if isinstance(tmod._linear_ce_row_kernel, triton.runtime.JITFunction):  # pragma: no cover
    pytest.skip("ann_kernels.triton.multi_exit_linear_ce was imported before TRITON_INTERPRET=1 was set "
                "(run this file in its own process)", allow_module_level=True)


def case(K, N, H, V, *, per_exit_head=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(N, H, generator=gen).requires_grad_() for _ in range(K)]
    weight = (torch.randn((K, V, H) if per_exit_head else (V, H), generator=gen) * 0.4).requires_grad_()
    b = torch.randn((K, V) if per_exit_head else (V,), generator=gen).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,), generator=gen)
    target[1] = -100
    return hidden, weight, b, target


@pytest.mark.parametrize("per_exit_head", [False, True])
@pytest.mark.parametrize("opts", [
    dict(), dict(label_smoothing=0.1, z_loss=1e-3), dict(sample="N"), dict(sample="KN", budget=700),
])
def test_matches_reference(per_exit_head, opts):
    K, N, H, V = 3, 5, 20, 37
    hidden, weight, b, target = case(K, N, H, V, per_exit_head=per_exit_head, seed=len(opts))
    weights = torch.tensor([0.5, 0.0, 1.0])  # exit 1 skipped (host-known 0)
    s = None
    if opts.get("sample"):
        s = torch.rand((N,) if opts["sample"] == "N" else (K, N), generator=torch.Generator().manual_seed(1))
    eps, z = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0)
    ema = torch.full((K,), float("nan"))
    out = tmod.multi_exit_linear_ce_fwd_triton(
        [h.detach() for h in hidden], weight.detach(), target, weights, None if b is None else b.detach(), s,
        -100, eps, z, ema, 0.9, [0, 2], opts.get("budget", 0), True)
    loss, per_exit, per_sample, conf, pred, gh, gw, gb = out
    ref = reference(hidden, weight, target, weights, bias=b, sample_weights=s, label_smoothing=eps, z_loss=z,
                    dtype=torch.float64)
    grads = [torch.zeros_like(t) if g is None else g
             for t, g in zip([*hidden, weight, b], torch.autograd.grad(ref.loss, [*hidden, weight, b], allow_unused=True))]
    assert max_abs_err(loss, ref.loss) <= 1e-5
    torch.testing.assert_close(per_exit, ref.per_exit, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(per_sample, ref.per_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(conf, ref.confidence, atol=1e-6, rtol=0, equal_nan=True)
    assert torch.equal(pred, ref.prediction)
    torch.testing.assert_close(ema, ref.per_exit, atol=1e-5, rtol=0, equal_nan=True)
    for k in range(K):
        torch.testing.assert_close(gh[k].double(), grads[k].double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw.double(), grads[K].double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb.double(), grads[K + 1].double(), rtol=1e-4, atol=1e-7)


def test_all_ignored_and_no_grad():
    hidden, weight, b, target = case(2, 4, 16, 20, seed=3)
    target[:] = -100
    out = tmod.multi_exit_linear_ce_fwd_triton([h.detach() for h in hidden], weight.detach(), target,
                                               torch.ones(2), b.detach(), None, -100, 0.2, 0.1, None, 0.9,
                                               [0, 1], 0, False)
    assert out[0].item() == 0.0 and torch.all(out[2] == 0) and all(t.numel() == 0 for t in out[5:])


def run_fwd(hidden, weight, target, weights, b=None, s=None, *, eps=0.0, z=0.0, ema=None, momentum=0.9,
            active=None, budget=0, grad=True):
    return tmod.multi_exit_linear_ce_fwd_triton(
        [h.detach() for h in hidden], weight.detach(), target, weights, None if b is None else b.detach(), s,
        -100, eps, z, ema, momentum, list(range(len(hidden))) if active is None else active, budget, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_out", [1.0, 2.0**16, 1 / 8, -3.0])
def test_low_precision_within_twice_torchs_error(dtype, grad_out):
    """Gradients within 2x torch's own error (fp64 truth) for every grad_out, through the
    public function and its C++ autograd (grad_out folding) with the Triton launcher behind
    the CPU op, over three chunks."""
    K, N, H, V = 2, 4, 20, 37
    hidden, weight, b, target = case(K, N, H, V, seed=5)
    hidden = [h.detach().to(dtype).requires_grad_() for h in hidden]
    weight, b = weight.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    w = torch.tensor([0.5, 1.0])
    ins = [*hidden, weight, b]
    with linear_ce_triton_behind_cpu_op():
        out = fused(hidden, weight, target, w, bias=b, label_smoothing=0.1, memory_budget_mb=3 * V * 2 / 2**20)
        grads = torch.autograd.grad(out.loss * grad_out, ins)
    tl = reference(hidden, weight, target, w, bias=b, label_smoothing=0.1)
    tgrads = torch.autograd.grad(tl.loss * grad_out, ins)
    truth = reference(hidden, weight, target, w, bias=b, label_smoothing=0.1, dtype=torch.float64)
    truth_grads = torch.autograd.grad(truth.loss * grad_out, ins)
    for g, tg, r in zip(grads, tgrads, truth_grads):
        assert g.dtype == dtype
        err, bound = low_precision_bound(g, tg, r, floor=1e-9 * abs(grad_out))
        assert err <= bound, (tuple(g.shape), err, bound)


def test_bf16_runs_bf16_gemms():
    """No fp32 path for bf16 inputs: every GEMM of the launcher (logits, grad_h, grad_W) is a
    torch GEMM on bf16 operands (cuBLAS tensor cores on a GPU), the head is never upcast."""
    hidden, weight, b, target = case(1, 3, 20, 37, seed=2)
    hidden = [h.detach().bfloat16() for h in hidden]
    weight, b = weight.detach().bfloat16(), b.detach().bfloat16()
    events = profiled_ops(lambda: run_fwd(hidden, weight, target, torch.ones(1), b))
    gemms = [e for e in events if e.name() in ("aten::mm", "aten::addmm", "aten::addmm_")]
    assert len(gemms) >= 3
    assert all(d == "c10::BFloat16" for e in gemms for d in e.dtypes() if d not in ("", "Scalar")), [e.dtypes() for e in gemms]
    for e in events:
        if e.name() in ("aten::_to_copy", "aten::to"):
            assert [37, 20] not in [list(x) for x in e.shapes()]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hidden_rows_give_nan_and_leave_the_ema(bad):
    """The defect this file once had: NaN per-sample losses were zeroed before the mean (per_exit
    3.566 and the EMA moved). Now: NaN per-exit loss, NaN loss, EMA of that exit untouched."""
    hidden, weight, b, target = case(2, 5, 20, 37, seed=4)
    with torch.no_grad():
        hidden[0][2, 3] = bad
    ema = torch.tensor([1.0, 2.0])
    out = run_fwd(hidden, weight, target, torch.ones(2), b, ema=ema)
    ref = reference(hidden, weight, target, bias=b, dtype=torch.float64)
    assert torch.isnan(out[1][0]) and torch.isnan(out[0]) and torch.isnan(out[2][0, 2])
    torch.testing.assert_close(out[1][1].double(), ref.per_exit[1].double(), rtol=1e-5, atol=0)
    assert ema[0].item() == 1.0
    torch.testing.assert_close(ema[1].item(), 0.9 * 2.0 + 0.1 * out[1][1].item(), rtol=1e-6, atol=0)


def test_ema_two_steps_against_a_hand_formula():
    m, expect = 0.8, [2.0, 3.0]
    ema = torch.tensor(expect)
    for seed in (1, 2):
        hidden, weight, b, target = case(2, 5, 20, 37, seed=seed)
        run_fwd(hidden, weight, target, torch.tensor([0.5, 1.0]), b, ema=ema, momentum=m, grad=False)
        truth = reference(hidden, weight, target, [0.5, 1.0], bias=b, dtype=torch.float64).per_exit.tolist()
        expect = [m * e + (1 - m) * t for e, t in zip(expect, truth)]
        torch.testing.assert_close(ema.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=0)


def test_out_of_range_target_is_a_python_error_before_any_launch():
    """target = V: a ValueError naming the token on the host (a device assert on CUDA would
    break the context for every later test)."""
    hidden, weight, b, target = case(2, 5, 20, 37, seed=3)
    target[4] = 37
    with pytest.raises(ValueError, match=r"target\[4\] = 37 is out of range"):
        run_fwd(hidden, weight, target, torch.ones(2), b)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    try:
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.backends.nvidia  # noqa: F401
    except Exception as error:  # no NVIDIA backend in this triton build
        print(f"SKIP: {error}")
        sys.exit(77)
    from ann_kernels.triton.multi_exit_linear_ce import _linear_ce_row_kernel as kernel

    for arch in (80, 90):
        for z_type in ("*bf16", "*fp16", "*fp32"):
            sig = {"z_ptr": z_type, "stride_z": "i64", "y_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
                   "conf_ptr": "*fp32", "pred_ptr": "*i64", "V": "i32", "ignore_index": "i32", "eps": "fp32",
                   "zcoef": "fp32"}
            consts = dict(COMPUTE_GRAD=True, BLOCK_V=4096)
            names = kernel.arg_names
            signature = {**sig, **{k: "constexpr" for k in consts}}
            assert set(signature) == set(names), set(names) ^ set(signature)
            src = ASTSource(fn=kernel, signature=signature,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8))
            assert compiled.asm.get("cubin"), "ptxas produced no cubin"
            ptx = compiled.asm["ptx"]
            # The row kernel does no GEMM work: the GEMMs are cuBLAS calls in the input dtype
            # (test_bf16_runs_bf16_gemms), so neither MMA nor a dot-product loop is here.
            assert "mma" not in ptx and "wgmma" not in ptx
            assert ("ld.global.b16" in ptx or "ld.global.v" in ptx or "ld.global" in ptx)
            print(f"sm_{arch} {z_type}: ok")
    """
)


def test_compiles_for_sm80_and_sm90():
    """The real compiler (no GPU needed): PTX + cubin for sm_80 / sm_90, in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=240)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
