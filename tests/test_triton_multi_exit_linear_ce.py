"""The Triton kernels of the fused linear + multi-exit cross-entropy
(``ann_kernels/triton/multi_exit_linear_ce.py``) against the float64 reference, run on CPU
tensors by Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported;
fp32 only, tiny shapes; 16-wide blocks so H = 20 and V = 37 run several masked tiles)."""

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

from ann_kernels import multi_exit_linear_cross_entropy_reference as reference  # noqa: E402
from ann_kernels.triton import multi_exit_linear_ce as tmod  # noqa: E402
from tests.utils import max_abs_err  # noqa: E402

if isinstance(tmod._linear_ce_logits_stats_kernel, triton.runtime.JITFunction):  # pragma: no cover
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
        torch.testing.assert_close(gh[k].double(), grads[k].double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gw.double(), grads[K].double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gb.double(), grads[K + 1].double(), atol=1e-5, rtol=0)


def test_all_ignored_and_no_grad():
    hidden, weight, b, target = case(2, 4, 16, 20, seed=3)
    target[:] = -100
    out = tmod.multi_exit_linear_ce_fwd_triton([h.detach() for h in hidden], weight.detach(), target,
                                               torch.ones(2), b.detach(), None, -100, 0.2, 0.1, None, 0.9,
                                               [0, 1], 0, False)
    assert out[0].item() == 0.0 and torch.all(out[2] == 0) and all(t.numel() == 0 for t in out[5:])


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
    from ann_kernels.triton.multi_exit_linear_ce import _linear_ce_grad_kernel, _linear_ce_logits_stats_kernel

    stats_ptrs = ["h_ptr", "w_ptr", "b_ptr", "z_ptr", "lse_ptr", "loss_ptr", "conf_ptr"]
    jobs = [
        (_linear_ce_logits_stats_kernel,
         {**{p: "*fp32" for p in stats_ptrs}, "y_ptr": "*i64", "pred_ptr": "*i64", "R": "i32", "V": "i32",
          "H": "i32", "stride_wv": "i32", "ignore_index": "i32", "eps": "fp32", "zcoef": "fp32"},
         dict(HAS_BIAS=True, BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, ALLOW_TF32=True)),
        (_linear_ce_logits_stats_kernel,
         {**{p: "*fp32" for p in stats_ptrs}, "y_ptr": "*i64", "pred_ptr": "*i64", "R": "i32", "V": "i32",
          "H": "i32", "stride_wv": "i32", "ignore_index": "i32", "eps": "fp32", "zcoef": "fp32"},
         dict(HAS_BIAS=False, BLOCK_M=64, BLOCK_V=128, BLOCK_H=32, ALLOW_TF32=False)),
        (_linear_ce_grad_kernel,
         {"z_ptr": "*fp32", "lse_ptr": "*fp32", "y_ptr": "*i64", "scale_ptr": "*fp32", "R": "i32", "V": "i32",
          "eps": "fp32", "zcoef": "fp32"},
         dict(BLOCK_M=64, BLOCK_V=128)),
    ]
    for arch in (80, 90):
        for kernel, sig, consts in jobs:
            names = kernel.arg_names
            signature = {**sig, **{k: "constexpr" for k in consts}}
            assert set(signature) == set(names), set(names) ^ set(signature)
            src = ASTSource(fn=kernel, signature=signature,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
            assert compiled.asm.get("cubin"), "ptxas produced no cubin"
            if consts.get("ALLOW_TF32"):
                assert "mma" in compiled.asm["ptx"], "tl.dot (TF32) did not become tensor-core MMA"
            print(f"sm_{arch} {kernel.fn.__name__}: ok")
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
