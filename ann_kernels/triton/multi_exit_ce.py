"""Fused multi-exit cross-entropy forward on the GPU, in Triton (``ann_kernels::multi_exit_ce_fwd``).

All K exits run in ONE launch with no host synchronisation. The heads stay separate
tensors (never stacked or copied): the launcher passes a small device table of their base
addresses and row strides, and each program turns its exit's address back into a typed
pointer (``tl.load(table + k).to(tl.pointer_type(DTYPE))``, the "array of pointers" of
Triton's grouped-GEMM tutorial).

Grid = (row blocks, K). A program owns BLOCK_N rows of one exit and streams over the C
classes in BLOCK_C chunks:

  1. the exit's pointer, the targets and their logits (one load per row), N_valid (counted
     on the device before the launch);
  2. pass 1, online softmax: running max, rescaled sum of exp, argmax and (label smoothing
     only) the sum of the row, in one read of the row;
  3. per-row outputs: loss, confidence = 1 / sum_exp, prediction;
  4. pass 2, the gradient of the weighted, averaged loss, written in the logits dtype
     (with C <= BLOCK_C the row is still in registers: no second read);
  5. per-exit sums by one atomic add per program;
  6. the last program to finish (atomic ticket) writes per_exit and loss and updates the
     AdaLoss running average in place.

Math (``shared/DESIGN.md``, same as ``csrc/cpu/multi_exit_ce.cpp``):
    l_ik = (1-e)(lse - z[y]) + e(lse - mean_c z),  L_k = sum_i l_ik / N_valid,
    loss = sum_k w_k L_k,  g_ikc = w_k / N_valid * (softmax_c - (1-e)[c = y] - e/C).

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


# The kernel uses only builtins (tl.reduce, tl.full, ...) and our own @triton.jit helpers,
# never tl.sum / tl.max / tl.zeros: those are @triton.jit functions of triton's standard
# library, which the interpreter runs only if TRITON_INTERPRET=1 was set before triton itself
# was first imported (and `import ann_kernels` imports triton); our helpers only need it set
# before this module is imported. The compiled code is the same (tl.sum = tl.reduce + add).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max_first_index(value1, index1, value2, index2):
    # The larger value; on a tie the smaller index (torch.argmax's rule).
    first = (value1 > value2) | ((value1 == value2) & (index1 < index2))
    return tl.where(first, value1, value2), tl.where(first, index1, index2)


@triton.jit
def _multi_exit_ce_kernel(
    table_ptr,  # [2K] int64: each head's base address, then each head's row stride (elements)
    target_ptr,  # [N] int64
    weight_ptr,  # [K] fp32
    n_valid_ptr,  # [] int64: number of rows with target != ignore_index
    per_sample_ptr,  # [K, N] fp32 out
    confidence_ptr,  # [K, N] fp32 out
    prediction_ptr,  # [K, N] int64 out
    grad_ptr,  # [K, N, C] logits dtype out (unused unless COMPUTE_GRAD)
    sums_ptr,  # [K] fp32 workspace, zeroed: per-exit sums of l_ik
    ticket_ptr,  # [1] int32 workspace, zeroed: programs finished
    per_exit_ptr,  # [K] fp32 out
    loss_ptr,  # [] fp32 out
    ema_ptr,  # [K] fp32 in/out (unused unless HAS_EMA)
    ema_stride,
    N,
    C,
    K,
    ignore_index,
    label_smoothing,
    momentum,
    DTYPE: tl.constexpr,  # element type of the logits (and of the gradient)
    BLOCK_N: tl.constexpr,  # rows per program (power of two)
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
    BLOCK_K: tl.constexpr,  # next power of two >= K (the final reduction over exits)
    ALIGN_BYTES: tl.constexpr,  # power of two <= 16 dividing every head's address and row stride (bytes)
    SINGLE_CHUNK: tl.constexpr,  # C <= BLOCK_C: keep the row in registers between passes
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0
    COMPUTE_GRAD: tl.constexpr,
    HAS_EMA: tl.constexpr,
):
    # 1. Who am I: rows [pid_n * BLOCK_N, +BLOCK_N) of exit k. Rows past N (last block)
    #    recompute row N-1 instead of loading -inf padding (no NaN from -inf - -inf);
    #    every store of them is masked off.
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1).to(tl.int64)  # int64: row * stride may exceed 2^31
    cols0 = tl.arange(0, BLOCK_C)

    # The exit's logits: an int64 address from the table, cast back to a typed pointer.
    x_base = tl.load(table_ptr + k).to(tl.pointer_type(DTYPE))
    x_stride = tl.load(table_ptr + K + k)
    # Row starts, as [BLOCK_N, 1]. A pointer from an integer carries no alignment, so restate
    # what the launcher checked: every row starts on an ALIGN_BYTES boundary (16 lets the
    # compiler issue 128-bit loads; without the hint every element is a scalar load).
    # (The hint goes on the 1-D [BLOCK_N] row pointers: with BLOCK_N = 1 the compiler folds
    # them to a scalar, and a 2-D hint on a scalar crashes its alignment analysis.)
    row_ptrs = tl.multiple_of(x_base + rows * x_stride, [ALIGN_BYTES])
    x_rows = row_ptrs[:, None]

    y = tl.load(target_ptr + rows)
    valid = y != ignore_index
    # A valid target outside [0, C) cannot raise without a host sync: its row's loss and
    # gradient become NaN instead (and it is never dereferenced: class 0 is read in its place).
    bad = valid & ((y < 0) | (y >= C))
    in_range = valid & ~bad
    # The target's logit: one load per row (cheaper than a gather-by-compare per chunk).
    z_y = tl.load(row_ptrs + tl.where(in_range, y, 0)).to(tl.float32)
    n_valid = tl.load(n_valid_ptr).to(tl.float32)
    # N_valid = 0 (every row ignored) -> L = 0 and g = 0, as in the reference.
    inv_n_valid = tl.where(n_valid > 0, 1.0 / tl.maximum(n_valid, 1.0), 0.0)

    # 2. Pass 1: online softmax over the chunks (Milakov & Gimelshein 2018).
    #    m = running max, s = sum_c exp(z_c - m) (rescaled when m grows), arg = first index
    #    of the max, sum_x = sum_c z_c (only for label smoothing).
    if SINGLE_CHUNK:
        col_mask = cols0 < C
        x = tl.load(x_rows + cols0[None, :], mask=col_mask[None, :], other=float("-inf")).to(tl.float32)
        m, arg = tl.reduce((x, tl.broadcast_to(cols0[None, :], [BLOCK_N, BLOCK_C])), 1, _max_first_index)
        # Shift by 0 if the whole row is -inf, like the chunked loop (its loss is not finite anyway).
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.reduce(tl.exp(x - m_safe[:, None]), 1, _add)
        if HAS_SMOOTHING:
            sum_x = tl.reduce(tl.where(col_mask[None, :], x, 0.0), 1, _add)
    else:
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        m_safe = tl.full([BLOCK_N], 0.0, tl.float32)
        s = tl.full([BLOCK_N], 0.0, tl.float32)
        sum_x = tl.full([BLOCK_N], 0.0, tl.float32)
        arg = tl.full([BLOCK_N], 0, tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            col_mask = cols < C
            x = tl.load(x_rows + cols[None, :], mask=col_mask[None, :], other=float("-inf")).to(tl.float32)
            chunk_max, chunk_arg = tl.reduce(
                (x, tl.broadcast_to(cols0[None, :], [BLOCK_N, BLOCK_C])), 1, _max_first_index
            )
            # Strict >: an equal maximum in a later chunk keeps the earlier index.
            arg = tl.where(chunk_max > m, chunk_arg + c0, arg)
            m = tl.maximum(m, chunk_max)
            # Shift by 0 while every logit so far is -inf (else exp(-inf - -inf) = NaN);
            # the old s is 0 then, and exp(old_shift - new_shift) rescales it exactly.
            new_safe = tl.where(m == float("-inf"), 0.0, m)
            s = s * tl.exp(m_safe - new_safe) + tl.reduce(tl.exp(x - new_safe[:, None]), 1, _add)
            m_safe = new_safe
            if HAS_SMOOTHING:
                sum_x += tl.reduce(tl.where(col_mask[None, :], x, 0.0), 1, _add)

    # 3. Per-row outputs. lse = m + log(s); max softmax prob = exp(m - lse) = 1 / s.
    eps = label_smoothing
    lse = m_safe + tl.log(s)
    loss = (1.0 - eps) * (lse - z_y)
    # The smoothing term only when e > 0 (with e = 0 and a -inf logit, 0 * inf would be NaN).
    if HAS_SMOOTHING:
        loss += eps * (lse - sum_x / C)
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    out_offs = k.to(tl.int64) * N + rows
    tl.store(per_sample_ptr + out_offs, loss, mask=row_mask)
    tl.store(confidence_ptr + out_offs, 1.0 / s, mask=row_mask)
    tl.store(prediction_ptr + out_offs, arg.to(tl.int64), mask=row_mask)

    # 4. Pass 2: g_c = a * exp(z_c - m) - b - h [c = y], with scale = w_k / N_valid,
    #    a = scale / s, b = scale * e / C, h = scale * (1 - e). Rows with scale = 0 (ignored,
    #    zero weight, no valid row) get exact zeros, even next to inf logits.
    if COMPUTE_GRAD:
        w = tl.load(weight_ptr + k).to(tl.float32)
        scale = tl.where(valid, w * inv_n_valid, 0.0)
        a = scale / s
        b = scale * eps / C
        h = scale * (1.0 - eps)
        keep = (scale != 0.0)[:, None]
        poison = bad[:, None]
        g_rows = grad_ptr + k.to(tl.int64) * N * C + rows[:, None] * C
        if SINGLE_CHUNK:
            g = tl.exp(x - m_safe[:, None]) * a[:, None] - b[:, None]
            g -= tl.where(cols0[None, :] == y[:, None], h[:, None], 0.0)
            g = tl.where(keep, g, 0.0)
            g = tl.where(poison, float("nan"), g)
            tl.store(g_rows + cols0[None, :], g.to(DTYPE), mask=row_mask[:, None] & (cols0 < C)[None, :])
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                col_mask = cols < C
                x = tl.load(x_rows + cols[None, :], mask=col_mask[None, :], other=float("-inf"))
                x = x.to(tl.float32)
                g = tl.exp(x - m_safe[:, None]) * a[:, None] - b[:, None]
                g -= tl.where(cols[None, :] == y[:, None], h[:, None], 0.0)
                g = tl.where(keep, g, 0.0)
                g = tl.where(poison, float("nan"), g)
                tl.store(g_rows + cols[None, :], g.to(DTYPE), mask=row_mask[:, None] & col_mask[None, :])

    # 5. Per-exit sum: one fp32 atomic per program (rows past N masked to 0).
    tl.atomic_add(sums_ptr + k, tl.reduce(tl.where(row_mask, loss, 0.0), 0, _add))

    # 6. "Last program finishes": take a ticket (acq_rel, gpu scope: releases the sum
    #    above, acquires everyone else's). The program holding the last ticket sees every
    #    sum, so it alone writes per_exit, loss and the running average.
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        offs_k = tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # Read the sums through atomics (adding 0) so they come from L2, never a stale L1 line.
        sums = tl.atomic_add(sums_ptr + offs_k, tl.full([BLOCK_K], 0.0, tl.float32), mask=k_mask)
        per_exit = sums * inv_n_valid
        tl.store(per_exit_ptr + offs_k, per_exit, mask=k_mask)
        w_all = tl.load(weight_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        tl.store(loss_ptr, tl.reduce(tl.where(k_mask, w_all * per_exit, 0.0), 0, _add))
        if HAS_EMA:
            # NaN = unset takes the first finite L_k; a non-finite L_k (|L| < inf is false
            # for inf and NaN) never enters the state.
            old = tl.load(ema_ptr + offs_k * ema_stride, mask=k_mask, other=0.0)
            blended = tl.where(old != old, per_exit, momentum * old + (1.0 - momentum) * per_exit)
            new = tl.where(tl.abs(per_exit) < float("inf"), blended, old)
            tl.store(ema_ptr + offs_k * ema_stride, new, mask=k_mask)


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


def multi_exit_ce_fwd_triton(
    logits,
    target: torch.Tensor,
    weights: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    ema: torch.Tensor | None,
    momentum: float,
    compute_grad: bool,
    *,
    block_c: int | None = None,
    block_n: int | None = None,
):
    """Launch :func:`_multi_exit_ce_kernel` once for all K exits.

    Returns ``(loss [] f32, per_exit [K] f32, per_sample [K, N] f32, confidence [K, N] f32,
    prediction [K, N] int64, grads)``, with ``grads`` the [K, N, C] gradient in the logits
    dtype (contiguous, so ``grads[k]`` is a contiguous [N, C]; already scaled by w_k / N_valid)
    or an empty [0] tensor when not ``compute_grad`` (the schema of
    ``ann_kernels::multi_exit_ce_fwd``). ``ema`` is updated in place. No host synchronisation.

    Runs on the tensors' device: CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests).
    ``block_c`` / ``block_n`` override the block sizes (powers of two; for tests).
    """
    heads = list(logits)
    if not heads:
        raise ValueError("multi_exit_cross_entropy: logits: expected at least one exit, got 0")
    first = heads[0]
    num_exits = len(heads)
    n, c = first.shape
    if first.dtype not in _TL_DTYPE:
        raise TypeError(
            f"multi_exit_cross_entropy: logits: expected float32, bfloat16 or float16, got {first.dtype}"
        )
    for k, z in enumerate(heads):
        if z.shape != first.shape or z.dtype != first.dtype or z.device != first.device:
            raise ValueError(
                f"multi_exit_cross_entropy: logits[{k}] is {z.dtype} {tuple(z.shape)} on {z.device}, "
                f"but logits[0] is {first.dtype} {tuple(first.shape)} on {first.device}"
            )
    if n == 0 or c == 0:
        raise ValueError(f"multi_exit_cross_entropy: logits: empty [N, C] = {tuple(first.shape)}")
    device = first.device
    interpreted = not isinstance(_multi_exit_ce_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"multi_exit_ce_fwd_triton: logits are on {device}, but the Triton kernel runs on CUDA "
            "(CPU tensors only under TRITON_INTERPRET=1, set before ann_kernels.triton.multi_exit_ce "
            "is imported; the CPU kernel is the C++ one behind torch.ops.ann_kernels.multi_exit_ce_fwd)"
        )
    # Rows must be unit-stride; any row stride is fine (a column slice is not copied).
    heads = [z if z.stride(1) == 1 or c == 1 else z.contiguous() for z in heads]
    target = target.contiguous()
    weights = weights.to(device=device, dtype=torch.float32).contiguous()

    # Addresses and row strides of the heads: one tiny host->device copy. non_blocking from
    # pageable memory is staged by the driver at once, so it neither waits for the GPU nor
    # leaves a dangling host buffer.
    table = torch.tensor(
        [z.data_ptr() for z in heads] + [z.stride(0) for z in heads], dtype=torch.int64
    ).to(device, non_blocking=True)
    # N_valid on the device (no .item()): the gradient scale needs it before any row is done.
    n_valid = (target != ignore_index).sum()
    # One zeroed workspace: K fp32 sums (0 bits = 0.0f) followed by the int32 ticket.
    workspace = torch.zeros(num_exits + 1, dtype=torch.int32, device=device)
    sums = workspace[:num_exits].view(torch.float32)
    ticket = workspace[num_exits:]

    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.empty((), **f32)
    per_exit = torch.empty(num_exits, **f32)
    per_sample = torch.empty(num_exits, n, **f32)
    confidence = torch.empty(num_exits, n, **f32)
    prediction = torch.empty(num_exits, n, dtype=torch.int64, device=device)
    grads = torch.empty((num_exits, n, c) if compute_grad else (0,), dtype=first.dtype, device=device)

    bn, bc, num_warps = _pick_blocks(n, c, device.type == "cuda", block_c, block_n)
    grid = (triton.cdiv(n, bn), num_exits)
    # Triton launches on the current CUDA device: make it the tensors' device.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _multi_exit_ce_kernel[grid](
            table,
            target,
            weights,
            n_valid,
            per_sample,
            confidence,
            prediction,
            grads if compute_grad else per_sample,  # never touched without COMPUTE_GRAD
            sums,
            ticket,
            per_exit,
            loss,
            ema if ema is not None else per_exit,  # never touched without HAS_EMA
            ema.stride(0) if ema is not None else 0,
            n,
            c,
            num_exits,
            ignore_index,
            float(label_smoothing),
            float(momentum),
            DTYPE=_TL_DTYPE[first.dtype],
            BLOCK_N=bn,
            BLOCK_C=bc,
            BLOCK_K=triton.next_power_of_2(num_exits),
            ALIGN_BYTES=_common_alignment(heads),
            SINGLE_CHUNK=c <= bc,
            HAS_SMOOTHING=label_smoothing > 0,
            COMPUTE_GRAD=bool(compute_grad),
            HAS_EMA=ema is not None,
            num_warps=num_warps,
        )
    # The heads (possibly fresh .contiguous() copies) and the table must outlive the
    # kernel: on CUDA the caching allocator's stream order already guarantees that.
    return loss, per_exit, per_sample, confidence, prediction, grads
