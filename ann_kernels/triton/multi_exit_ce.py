"""Fused multi-exit cross-entropy on the GPU, in Triton: the launchers of the kernels in
``ann_kernels/triton/multi_exit_ce_kernels.py``, behind the backend ops
``ann_kernels::_multi_exit_ce_forward`` (forward, optionally the pre-scaled gradient, fp16's
times 2^m, or lse),
``ann_kernels::_multi_exit_ce_backward`` (the gradient from lse for any grad_out) and
``ann_kernels::_multi_exit_ce_scale_`` (grads *= grad_out in place, nothing when it is 1).

All K exits run in ONE launch with no host synchronisation. This module picks the block
sizes, checks what guards memory, builds the heads' pointer table and launches.

Argument checks happen once, in the op's C++ Autograd / CompositeExplicitAutograd kernels,
before dispatch reaches these launchers (the launchers re-check only what guards memory).
NaN weights are not read on the host (that would synchronise): they give NaN loss/gradients.

Differences from the C++ CPU kernel, all forced by "no host synchronisation":
- a valid target outside [0, C) cannot raise: that row's loss and gradient are NaN (so are
  L_k and the loss, and the running average skips L_k);
- per-exit sums use fp32 atomics, so their order (last bits of L_k and loss) may vary from
  run to run; per-row outputs and gradients are deterministic;
- the pointer table is a host->device copy per call, which CUDA-graph capture does not allow.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ann_kernels.triton.multi_exit_ce_kernels import (  # noqa: F401 - the kernels are part of this module's API
    _multi_exit_ce_bwd_kernel,
    _multi_exit_ce_kernel,
    _scale_grads_kernel,
)

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Block sizes. GPU: a chunk of up to 4096 classes (16 KB of fp32 per program = 16 values
# per thread at 8 warps, which keeps the online softmax in registers without spilling);
# small-C problems pack rows so that a program still holds ~4096 logits. The interpreter
# (CPU tensors, TRITON_INTERPRET=1) runs blocks as numpy arrays: per-op Python overhead
# dominates, so small blocks cost little, and BLOCK_C = 16 makes modest C (e.g. 33)
# exercise the chunked loop.
_GPU_MAX_BLOCK_C = 4096
_GPU_TILE = 4096
_INTERP_MAX_BLOCK_C = 16
_INTERP_TILE = 256


def _pick_blocks(n: int, c: int, on_gpu: bool, block_c: int | None, block_n: int | None):
    """(BLOCK_N, BLOCK_C, num_warps) for N rows of C classes."""
    max_block_c, tile = (_GPU_MAX_BLOCK_C, _GPU_TILE) if on_gpu else (_INTERP_MAX_BLOCK_C, _INTERP_TILE)
    if block_c is None:
        block_c = min(triton.next_power_of_2(c), max_block_c)
    if block_n is None:
        block_n = max(1, min(tile // block_c, triton.next_power_of_2(n)))
    for name, value in (("block_c", block_c), ("block_n", block_n)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}: expected a power of two, got {value}")
    # 4 warps (128 threads) up to 2048 values per chunk, 8 warps above: ~16 fp32 per thread.
    num_warps = 8 if block_n * block_c > 2048 else 4
    return block_n, block_c, num_warps


def _common_alignment(heads: list[torch.Tensor]) -> int:
    """Largest power of two <= 16 dividing every head's address and (N > 1) row stride, in bytes."""
    elsize = heads[0].element_size()
    acc = 16
    for z in heads:
        acc |= z.data_ptr()
        if z.shape[0] > 1:
            acc |= z.stride(0) * elsize
    return acc & -acc  # lowest set bit (the 16 caps it)


def _prepare_heads(logits, name: str) -> list[torch.Tensor]:
    """The memory-safety checks of the launchers (the full argument check ran in the op's
    C++ kernels; direct callers of the launchers get at least these)."""
    heads = list(logits)
    if not heads:
        raise ValueError("multi_exit_cross_entropy: logits: expected at least one exit, got 0")
    first = heads[0]
    if first.dtype not in _TL_DTYPE:
        raise TypeError(
            f"multi_exit_cross_entropy: logits: expected float32, bfloat16 or float16, got {first.dtype}"
        )
    for k, z in enumerate(heads):
        if z.dim() != 2 or z.shape != first.shape or z.dtype != first.dtype or z.device != first.device:
            raise ValueError(
                f"multi_exit_cross_entropy: logits[{k}] is {z.dtype} {tuple(z.shape)} on {z.device}, "
                f"but logits[0] is {first.dtype} {tuple(first.shape)} on {first.device}"
            )
    n, c = first.shape
    if n == 0 or c == 0:
        raise ValueError(f"multi_exit_cross_entropy: logits: empty [N, C] = {tuple(first.shape)}")
    interpreted = not isinstance(_multi_exit_ce_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1
    if first.device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"{name}: logits are on {first.device}, but the Triton kernel runs on CUDA "
            "(CPU tensors only under TRITON_INTERPRET=1, set before ann_kernels.triton.multi_exit_ce "
            "is imported; the CPU kernel is the C++ one behind torch.ops.ann_kernels._multi_exit_ce_forward)"
        )
    # Rows must be unit-stride; any row stride is fine (a column slice is not copied).
    return [z if z.stride(1) == 1 or c == 1 else z.contiguous() for z in heads]


def _weights_args(heads, target, weights, sample_weights):
    """(weights fp32 or a dummy, HAS_WEIGHTS, sample weights fp32 or a dummy, their k-stride,
    HAS_SW), after the shape checks that guard memory."""
    num_exits, (n, _) = len(heads), heads[0].shape
    device = heads[0].device
    if target.shape != (n,) or target.dtype != torch.int64 or target.device != device:
        raise ValueError(f"multi_exit_cross_entropy: target: expected int64 [{n}] on {device}, "
                         f"got {target.dtype} {tuple(target.shape)} on {target.device}")
    has_w = weights is not None
    if has_w:
        if weights.shape != (num_exits,) or weights.device != device:
            raise ValueError(f"multi_exit_cross_entropy: weights: expected {num_exits} values on {device}, "
                             f"got shape {tuple(weights.shape)} on {weights.device}")
        weights = weights.to(dtype=torch.float32).contiguous()
    has_sw = sample_weights is not None
    sw_stride = 0
    if has_sw:
        if sample_weights.shape not in ((n,), (num_exits, n)) or sample_weights.device != device:
            raise ValueError(f"multi_exit_cross_entropy: sample_weights: expected shape [{n}] or [{num_exits}, {n}] "
                             f"on {device}, got {tuple(sample_weights.shape)} on {sample_weights.device}")
        sample_weights = sample_weights.to(dtype=torch.float32).contiguous()
        sw_stride = n if sample_weights.dim() == 2 else 0
    dummy = target  # never dereferenced when its flag is off
    return (weights if has_w else dummy, has_w, sample_weights if has_sw else dummy, sw_stride, has_sw)


def fp16_grad_pow2(w, has_w, sw, has_sw, valid, n_valid) -> torch.Tensor:
    """[2] fp32 {2^m, 2^-m} on the device, no host sync: the power of two that fp16's gradient
    buffer is stored times (grad_mode 3/4), m = 15 - e for the largest row scale
    S = max |w_k s_ik| / N_valid = f 2^e (f in [0.5, 1)), so that |2^m S (p - t)| < 2^15 never
    overflows fp16; m = 0 for S = 0 or not finite; clamped to [-120, 120]. The same rule as
    ``pow2_exponent_safe`` in csrc/cpu/multi_exit_ce.cpp (CUDA takes no hint from past
    grad_outs: grad_mode 4 is 3 here)."""
    inv_n = torch.where(n_valid > 0, 1.0 / n_valid.clamp(min=1).to(torch.float32), 0.0)
    w_max = w.abs().max() if has_w else torch.ones((), dtype=torch.float32, device=valid.device)
    if has_sw:
        s_abs = torch.where(valid, sw.abs(), 0.0)  # [N] or [K, N]: only valid rows count
        s_max = s_abs.amax(dim=-1) if s_abs.dim() == 2 else s_abs.max()
        scale = ((w if has_w else w_max).abs() * inv_n * s_max).max()
    else:
        scale = w_max * inv_n
    _, e = torch.frexp(scale)
    m = torch.where(torch.isfinite(scale) & (scale > 0), 15 - e, 0).clamp(-120, 120).to(torch.int32)
    # Built in the exponent bits (exact; exp2 need not be on every device).
    return torch.stack([m + 127, 127 - m]).bitwise_left_shift(23).view(torch.float32)


def _pointer_table(heads, device) -> torch.Tensor:
    # Addresses and row strides of the heads: one tiny host->device copy. On CUDA the host
    # tensor is pinned first: a copy from pageable memory synchronises the stream before it
    # starts (CUDA's documented behaviour for pageable cudaMemcpyAsync), i.e. one host sync per
    # call; from pinned memory it is truly asynchronous, and the caching host allocator keeps the
    # pinned block alive until the copy has run. Under the interpreter (CPU) nothing is copied.
    table = torch.tensor([z.data_ptr() for z in heads] + [z.stride(0) for z in heads], dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def multi_exit_ce_forward_triton(
    logits,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    ema: torch.Tensor | None,
    momentum: float,
    grad_mode: int,
    *,
    block_c: int | None = None,
    block_n: int | None = None,
):
    """Launch :func:`_multi_exit_ce_kernel` once for all K exits (``_multi_exit_ce_forward``).

    Returns ``(loss [] f32, per_exit [K] f32, per_sample [K, N] f32, confidence [K, N] f32,
    prediction [K, N] int64, lse, grads)``: ``lse`` [K, N] f32 when ``grad_mode == 2`` and
    ``grads`` [K, N, C] in the logits dtype (contiguous; scaled by w_k s_ik / N_valid) when
    ``grad_mode == 1``; ``grad_mode`` 3 or 4 (fp16): ``grads`` scaled by 2^m w_k s_ik / N_valid
    and ``lse`` = [2] f32 {2^-m, 2^-m} (see :func:`fp16_grad_pow2`); else empty [0] tensors.
    ``ema`` is updated in place. No host sync.

    Runs on the tensors' device: CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests).
    ``block_c`` / ``block_n`` override the block sizes (powers of two; for tests).
    """
    heads = _prepare_heads(logits, "multi_exit_ce_forward_triton")
    first = heads[0]
    num_exits = len(heads)
    n, c = first.shape
    device = first.device
    if ema is not None and (ema.shape != (num_exits,) or ema.dtype != torch.float32 or ema.device != device):
        raise ValueError(f"multi_exit_cross_entropy: ema: expected a float32 tensor of shape [{num_exits}] on "
                         f"{device}, got {ema.dtype} of shape {tuple(ema.shape)} on {ema.device}")
    target = target.contiguous()
    w, has_w, sw, sw_stride, has_sw = _weights_args(heads, target, weights, sample_weights)
    table = _pointer_table(heads, device)
    # N_valid on the device (no .item()): the gradient scale needs it before any row is done.
    n_valid = (target != ignore_index).sum()
    # One zeroed workspace: 2K fp32 sums (0 bits = 0.0f) followed by the int32 ticket.
    workspace = torch.zeros(2 * num_exits + 1, dtype=torch.int32, device=device)
    sums = workspace[: 2 * num_exits].view(torch.float32)
    ticket = workspace[2 * num_exits:]

    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.empty((), **f32)
    per_exit = torch.empty(num_exits, **f32)
    per_sample = torch.empty(num_exits, n, **f32)
    confidence = torch.empty(num_exits, n, **f32)
    prediction = torch.empty(num_exits, n, dtype=torch.int64, device=device)
    pow2 = grad_mode in (3, 4)
    compute_grad = grad_mode == 1 or pow2
    lse = torch.empty((num_exits, n) if grad_mode == 2 else (0,), **f32)
    grads = torch.empty((num_exits, n, c) if compute_grad else (0,), dtype=first.dtype, device=device)
    if pow2:
        grad_pow2 = fp16_grad_pow2(w, has_w, sw, has_sw, target != ignore_index, n_valid)
        lse = grad_pow2[1].repeat(2)  # {2^-m, 2^-m_safe}: here m = m_safe

    bn, bc, num_warps = _pick_blocks(n, c, device.type == "cuda", block_c, block_n)
    grid = (triton.cdiv(n, bn), num_exits)
    # Triton launches on the current CUDA device: make it the tensors' device.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _multi_exit_ce_kernel[grid](
            table, target, w, sw, sw_stride, n_valid, grad_pow2 if pow2 else per_sample, per_sample,
            lse if grad_mode == 2 else per_sample,  # never touched without SAVE_LSE
            confidence, prediction,
            grads if compute_grad else per_sample,  # never touched without COMPUTE_GRAD
            sums, ticket, per_exit, loss,
            ema if ema is not None else per_exit,  # never touched without HAS_EMA
            ema.stride(0) if ema is not None else 0,
            n, c, num_exits, ignore_index, float(label_smoothing), float(momentum),
            DTYPE=_TL_DTYPE[first.dtype],
            BLOCK_N=bn,
            BLOCK_C=bc,
            BLOCK_K=triton.next_power_of_2(num_exits),
            ALIGN_BYTES=_common_alignment(heads),
            SINGLE_CHUNK=c <= bc,
            HAS_SMOOTHING=label_smoothing > 0,
            COMPUTE_GRAD=compute_grad,
            HAS_EMA=ema is not None,
            HAS_WEIGHTS=has_w,
            HAS_SW=has_sw,
            SAVE_LSE=grad_mode == 2,
            GRAD_POW2=pow2,
            num_warps=num_warps,
        )
    # The heads (possibly fresh .contiguous() copies) and the table must outlive the
    # kernel: on CUDA the caching allocator's stream order already guarantees that.
    return loss, per_exit, per_sample, confidence, prediction, lse, grads


def multi_exit_ce_fwd_triton(logits, target, weights, ignore_index, label_smoothing, ema, momentum, compute_grad,
                             *, block_c=None, block_n=None):
    """The older 6-output form (``multi_exit_ce_fwd``): :func:`multi_exit_ce_forward_triton`
    with grad_mode 1 (compute_grad) or 0, without lse: the gradient in the logits dtype in
    every dtype (the op ``multi_exit_ce_fwd`` itself gives fp16 logits an fp32 gradient from
    grad_mode 3's 2^m-scaled buffer, ``csrc/cpu/multi_exit_ce.cpp``)."""
    out = multi_exit_ce_forward_triton(logits, target, weights, None, ignore_index, label_smoothing, ema, momentum,
                                       1 if compute_grad else 0, block_c=block_c, block_n=block_n)
    return out[:5] + out[6:]


def multi_exit_ce_backward_triton(grad_loss, logits, target, weights, sample_weights, lse, ignore_index: int,
                                  label_smoothing: float, *, block_c: int | None = None,
                                  block_n: int | None = None) -> torch.Tensor:
    """Launch :func:`_multi_exit_ce_bwd_kernel` (``_multi_exit_ce_backward``): the [K, N, C]
    gradient in the logits dtype for grad_out = ``grad_loss`` (a [] tensor, read on the
    device), from the forward's ``lse`` [K, N] f32. No host synchronisation."""
    heads = _prepare_heads(logits, "multi_exit_ce_backward_triton")
    first = heads[0]
    num_exits = len(heads)
    n, c = first.shape
    device = first.device
    if lse.shape != (num_exits, n):
        raise ValueError(f"multi_exit_ce_backward_triton: lse: expected shape [{num_exits}, {n}], "
                         f"got {tuple(lse.shape)}")
    target = target.contiguous()
    w, has_w, sw, sw_stride, has_sw = _weights_args(heads, target, weights, sample_weights)
    table = _pointer_table(heads, device)
    n_valid = (target != ignore_index).sum()
    grad_loss = grad_loss.to(device=device, dtype=torch.float32).reshape(())
    grads = torch.empty((num_exits, n, c), dtype=first.dtype, device=device)
    bn, bc, num_warps = _pick_blocks(n, c, device.type == "cuda", block_c, block_n)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _multi_exit_ce_bwd_kernel[(triton.cdiv(n, bn), num_exits)](
            table, target, w, sw, sw_stride, lse.contiguous(), grad_loss, n_valid, grads,
            n, c, num_exits, ignore_index, float(label_smoothing),
            DTYPE=_TL_DTYPE[first.dtype],
            BLOCK_N=bn,
            BLOCK_C=bc,
            ALIGN_BYTES=_common_alignment(heads),
            HAS_WEIGHTS=has_w,
            HAS_SW=has_sw,
            num_warps=num_warps,
        )
    return grads


def scale_grads_triton(grads: torch.Tensor, grad_loss: torch.Tensor, *, block: int | None = None) -> None:
    """``grads *= grad_loss`` in place (``_multi_exit_ce_scale_``); every program returns at
    once when grad_loss == 1, so grad_out = 1 costs one tiny launch and no memory traffic."""
    if not grads.is_contiguous():
        raise ValueError("scale_grads_triton: grads must be contiguous")
    numel = grads.numel()
    if numel == 0:
        return
    on_gpu = grads.device.type == "cuda"
    block = block or (4096 if on_gpu else 256)
    grad_loss = grad_loss.to(device=grads.device, dtype=torch.float32).reshape(())
    with torch.cuda.device(grads.device) if on_gpu else contextlib.nullcontext():
        _scale_grads_kernel[(triton.cdiv(numel, block),)](grads, grad_loss, numel, BLOCK=block,
                                                           num_warps=8 if on_gpu else 1)
