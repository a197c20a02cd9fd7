"""Fused linear + multi-exit cross-entropy on the GPU, in Triton
(``ann_kernels::multi_exit_linear_ce_fwd``; same outputs and semantics as
``csrc/cpu/multi_exit_linear_ce.cpp``).

The flattened active rows (exit, token) are processed in chunks of R rows whose fp32
logits [R, V] fit the memory budget (a shared head stacks several exits per chunk):

  1. ``_linear_ce_logits_stats_kernel``, grid (row blocks): per vocabulary tile, logits =
     h_chunk @ W_tile^T (+ b) through ``tl.dot`` over H blocks (fp32), stored into the
     chunk buffer, and the online row statistics (max, rescaled sum of exp, first argmax,
     sum, target logit) -> lse, loss (with label smoothing and z-loss), confidence,
     prediction;
  2. ``_linear_ce_grad_kernel``, grid (row blocks, vocab blocks): the buffer becomes the
     gradient g = scale ((1 + 2 z lse) softmax - e/V - (1-e) onehot) in place;
  3. grad_h_chunk = g @ W and grad_W += g^T @ h_chunk (cuBLAS, fp32), grad_b += sum_r g.

The logits GEMM uses TF32 exactly when torch's fp32 matmuls do
(``torch.backends.cuda.matmul.allow_tf32``), else IEEE fp32. So each chunk reads W twice (once in tl.dot, once per backward GEMM), like the CPU path's
one-tile plan. Per-exit sums are torch reductions; no host synchronisation anywhere (the
active exits come from the host). Differences from the C++ kernel: an out-of-range
target is reported by ``torch._assert_async`` (an asynchronous device assert), not a
ValueError; rows with non-finite logits are not special-cased (they give NaN).
Low-precision inputs are upcast to fp32 (GEMMs included), as on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["multi_exit_linear_ce_fwd_triton"]


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max_first_index(value1, index1, value2, index2):
    first = (value1 > value2) | ((value1 == value2) & (index1 < index2))
    return tl.where(first, value1, value2), tl.where(first, index1, index2)


@triton.jit
def _linear_ce_logits_stats_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, z_ptr, lse_ptr, loss_ptr, conf_ptr, pred_ptr,
    R, V, H, stride_wv, ignore_index, eps, zcoef,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.full((BLOCK_M,), 0.0, tl.float32)
    sx = tl.full((BLOCK_M,), 0.0, tl.float32)
    xt = tl.full((BLOCK_M,), 0.0, tl.float32)
    am = tl.full((BLOCK_M,), 0, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.full((BLOCK_M, BLOCK_V), 0.0, tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < H
            a = tl.load(h_ptr + rows[:, None] * H + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + cols[None, :] * stride_wv + hh[:, None], mask=col_ok[None, :] & h_ok[:, None],
                         other=0.0)
            if ALLOW_TF32:
                acc += tl.dot(a, wt, input_precision="tf32")
            else:
                acc += tl.dot(a, wt, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(z_ptr + rows[:, None] * V + cols[None, :], acc, mask=ok)
        x = tl.where(col_ok[None, :], acc, float("-inf"))
        idx = tl.broadcast_to(cols[None, :].to(tl.int64), (BLOCK_M, BLOCK_V))
        tmax, targ = tl.reduce((x, idx), 1, _max_first_index)
        m_new = tl.maximum(m, tmax)
        s = s * tl.exp(m - m_new) + tl.reduce(tl.exp(x - m_new[:, None]), 1, _add)
        am = tl.where(tmax > m, targ, am)
        m = m_new
        sx += tl.reduce(tl.where(col_ok[None, :], acc, 0.0), 1, _add)
        xt += tl.reduce(tl.where(cols[None, :] == y[:, None], acc, 0.0), 1, _add)
    lse = m + tl.log(s)
    valid = y != ignore_index
    nll = lse - xt
    loss = (1.0 - eps) * nll + eps * (lse - sx / V) + zcoef * lse * lse
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    tl.store(conf_ptr + rows, 1.0 / s, mask=row_ok)
    tl.store(pred_ptr + rows, am, mask=row_ok)


@triton.jit
def _linear_ce_grad_kernel(z_ptr, lse_ptr, y_ptr, scale_ptr, R, V, eps, zcoef,
                           BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < R, cols < V
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(z_ptr + rows[:, None] * V + cols[None, :], mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    amp = scale * (1.0 + 2.0 * zcoef * lse)
    g = tl.exp(x - lse[:, None]) * amp[:, None] - (scale * eps / V)[:, None]
    g = g - tl.where(cols[None, :] == y[:, None], (scale * (1.0 - eps))[:, None], 0.0)
    g = tl.where(scale[:, None] == 0.0, 0.0, g)
    tl.store(z_ptr + rows[:, None] * V + cols[None, :], g, mask=ok)


def _blocks(on_gpu: bool, H: int):
    if on_gpu:
        return 64, 128, 32
    return 16, 16, 16  # the interpreter: small blocks, several tiles even on tiny shapes


def multi_exit_linear_ce_fwd_triton(hidden, weight, target, weights, bias, sample_weights, ignore_index,
                                    label_smoothing, z_loss, ema, momentum, active, budget_bytes, compute_grad):
    """The ``multi_exit_linear_ce_fwd`` outputs (see ``csrc/ops.cpp``) for CUDA tensors (or
    CPU tensors under ``TRITON_INTERPRET=1``)."""
    from ann_kernels.ops.multi_exit_ce import update_ema_
    from ann_kernels.ops.multi_exit_linear_ce import _validate, default_budget_bytes

    _validate(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss, ema, momentum,
              check_values=False)
    K, (N, H) = len(hidden), hidden[0].shape
    V = weight.shape[-2]
    dev = hidden[0].device
    on_gpu = dev.type == "cuda"
    f32 = dict(dtype=torch.float32, device=dev)
    per_exit_head = weight.dim() == 3
    valid = target != ignore_index
    torch._assert_async(((target >= 0) & (target < V) | ~valid).all(),
                        "multi_exit_linear_cross_entropy: a target is out of range for the vocabulary")
    n_valid = valid.sum().clamp(min=1).float()
    w32 = weights.detach().float()
    s32 = None if sample_weights is None else sample_weights.detach().float()
    nan = float("nan")
    per_sample = torch.zeros(K, N, **f32)  # exits not computed: 0 (per_exit NaN)
    confidence = torch.full((K, N), nan, **f32)
    prediction = torch.full((K, N), -1, dtype=torch.int64, device=dev)
    gh = torch.zeros(K, N, H, **f32) if compute_grad else torch.empty(0, **f32)
    gw = torch.zeros(weight.shape, **f32) if compute_grad else torch.empty(0, **f32)
    gb = torch.zeros(bias.shape, **f32) if (compute_grad and bias is not None) else torch.empty(0, **f32)
    W32 = weight.detach().float().contiguous()
    B32 = None if bias is None else bias.detach().float().contiguous()
    budget = budget_bytes if budget_bytes > 0 else default_budget_bytes()
    rows_per_chunk = max(1, budget // (4 * V))
    BM, BV, BH = _blocks(on_gpu, H)
    split = per_exit_head or (bias is not None and bias.dim() == 2)
    eps, zc = float(label_smoothing), float(z_loss)
    # Same precision as torch's own fp32 matmuls (F.linear): TF32 only where torch allows it.
    tf32 = on_gpu and torch.backends.cuda.matmul.allow_tf32
    # Flattened active rows: (slot a, token i) -> row a * N + i.
    if active:
        h_all = torch.stack([hidden[k].detach() for k in active]).reshape(-1, H).float()
        act = torch.tensor(list(active), device=dev)
        y_all = target.repeat(len(active))
        sw = torch.ones(len(active), N, **f32) if s32 is None else (
            s32.expand(len(active), N) if s32.dim() == 1 else s32[act])
        scale_all = torch.where(valid[None, :], w32[act][:, None] * sw / n_valid, 0.0).reshape(-1).contiguous()
        total = len(active) * N
        r0 = 0
        while r0 < total:
            R = min(rows_per_chunk, total - r0)
            if split:
                R = min(R, (r0 // N + 1) * N - r0)
            slot0 = r0 // N
            k0 = active[slot0]
            h = h_all[r0:r0 + R].contiguous()
            y = y_all[r0:r0 + R].contiguous()
            Wk = W32[k0] if per_exit_head else W32
            bk = None if B32 is None else (B32[k0] if B32.dim() == 2 else B32)
            z = torch.empty(R, V, **f32)
            lse, loss, conf = (torch.empty(R, **f32) for _ in range(3))
            pred = torch.empty(R, dtype=torch.int64, device=dev)
            _linear_ce_logits_stats_kernel[(triton.cdiv(R, BM),)](
                h, Wk, bk if bk is not None else Wk, y, z, lse, loss, conf, pred, R, V, H, Wk.stride(0),
                ignore_index, eps, zc, HAS_BIAS=bk is not None, BLOCK_M=BM, BLOCK_V=BV, BLOCK_H=BH,
                ALLOW_TF32=tf32)
            rows = torch.arange(r0, r0 + R, device=dev)
            ks, iis = act[rows // N], rows % N
            per_sample[ks, iis] = loss
            confidence[ks, iis] = conf
            prediction[ks, iis] = pred
            if compute_grad:
                _linear_ce_grad_kernel[(triton.cdiv(R, BM), triton.cdiv(V, BV))](
                    z, lse, y, scale_all[r0:r0 + R].contiguous(), R, V, eps, zc, BLOCK_M=BM, BLOCK_V=BV)
                gh[ks, iis] = z @ Wk
                (gw[k0] if per_exit_head else gw).addmm_(z.t(), h)
                if bias is not None:
                    (gb[k0] if gb.dim() == 2 else gb).add_(z.sum(0))
            r0 += R
    # Per-exit means L_k = sum_i s_ik l_ik / N_valid; NaN for exits not computed.
    ps0 = torch.nan_to_num(per_sample, nan=0.0)
    s_full = torch.ones(K, N, **f32) if s32 is None else s32.expand(K, N)
    per_exit = torch.full((K,), nan, **f32)
    if active:
        act = torch.tensor(list(active), device=dev)
        per_exit[act] = ((s_full * ps0).sum(1) / n_valid)[act]
    loss = (w32 * torch.nan_to_num(per_exit, nan=0.0)).sum()
    if ema is not None:
        update_ema_(ema, per_exit, momentum)
    return loss, per_exit, per_sample, confidence, prediction, gh, gw, gb
