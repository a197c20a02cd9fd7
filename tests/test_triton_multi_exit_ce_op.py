"""The public op ``ann_kernels.multi_exit_cross_entropy`` on the Triton kernels (issues 20,
24): its C++ argument check, C++ autograd and grad-mode choice, with its CPU backend ops
routed to the Triton launchers (``tests/utils.py: triton_behind_cpu_ops``) and run on CPU
tensors by Triton's interpreter. The same checks run on the C++ kernel and on CUDA in
``tests/test_multi_exit_ce_training.py``. Shapes are tiny (the interpreter is ~1000x slower
than a GPU); C = 33 runs the chunked loop (BLOCK_C = 16 on CPU).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel module are imported

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): Triton kernels untested")

from ann_kernels import multi_exit_cross_entropy  # noqa: E402
from tests.low_precision_helpers import (  # noqa: E402
    check_fp16_extreme_logits,
    check_fp16_grad_scaler_scales,
    check_fp16_legacy_entry,
    check_fp16_tiny_grad_out,
)
from tests.utils import (  # noqa: E402
    assert_same_grad_scaler_runs,
    check_ema_two_steps_and_non_finite_rows,
    check_grad_out_within_twice_torch,
    grad_scaler_loop,
    make_logits,
    requires_ext,
    triton_behind_cpu_ops,
)

pytestmark = requires_ext  # the op's C++ autograd drives the Triton kernels


def test_triton_behind_cpu_ops_really_runs_triton():
    """The routing the tests below rely on: inside, an out-of-range target poisons its row
    (Triton cannot raise without a host sync); outside, the C++ kernel raises again."""
    heads, target = make_logits(2, 4, 5), torch.tensor([0, 9, 1, 2])
    with triton_behind_cpu_ops():
        out = multi_exit_cross_entropy(heads, target)
        assert out.per_sample[:, 1].isnan().all() and torch.isfinite(out.per_sample[:, [0, 2, 3]]).all()
    with pytest.raises(ValueError, match=r"target\[1\] = 9 is out of range"):
        multi_exit_cross_entropy(heads, target)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_out", [1.0, 2.0 ** 16, 0.125, -3.0])
def test_op_low_precision_grad_out_on_triton(dtype, grad_out):
    """Issue 20 on the Triton path: bf16's and fp16's gradient buffers (forward; fp16's times
    2^m) scaled in place by the scale kernel; small grid (C = 33: three BLOCK_C = 16 chunks)."""
    with triton_behind_cpu_ops():
        check_grad_out_within_twice_torch("cpu", dtype, grad_out, num_classes=33, n=24, interpreter=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_grad_scaler_loop_on_triton(dtype):
    """Issue 24 item 9: the GradScaler claim (docs/loss.md) on the Triton path; a short loop
    (4 steps of 16 rows, the scale grown every step) keeps the interpreter's time small."""
    with triton_behind_cpu_ops():
        runs = grad_scaler_loop(dtype, "cpu", steps=4, n=16, growth_interval=1)
    assert_same_grad_scaler_runs(runs, dtype, growths=4, interpreter=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_ema_two_steps_and_non_finite_rows_on_triton(dtype):
    with triton_behind_cpu_ops():
        check_ema_two_steps_and_non_finite_rows("cpu", dtype)


@pytest.mark.parametrize("check", [check_fp16_grad_scaler_scales, check_fp16_tiny_grad_out, check_fp16_extreme_logits],
                         ids=["grad_scaler_2e16_2e24", "tiny_grad_out_2e-20", "extreme_logits_1e4"])
def test_op_fp16_gradient_buffer_on_triton(check):
    """Issue 20: fp16's gradient buffer (2^m chosen on the device, tests/low_precision_helpers.py)
    on the Triton kernels: GradScaler's 2^16 / 2^24, grad_out 2^-20, +-1e4 logits."""
    with triton_behind_cpu_ops():
        if check is check_fp16_extreme_logits:
            check("cpu", c=33)
        else:
            check("cpu", n=24, c=33)


def test_fp16_legacy_entry_on_triton():
    """Issue 20: the older entry ``multi_exit_ce_fwd`` on the Triton kernels: fp16's gradient
    for grad_out = 1 in fp32 (from the buffer stored at 2^m on the device), scaled by the
    caller's 2^16, 1/8 or -3 within two roundings and 2x torch's error. C = 300 as on C++: at
    C = 33 torch's own fp16 error is about one rounding, and two roundings sat at 2.04x it
    for grad_out = -3 (within the two-rounding bound)."""
    with triton_behind_cpu_ops():
        check_fp16_legacy_entry("cpu", n=24, c=300)
