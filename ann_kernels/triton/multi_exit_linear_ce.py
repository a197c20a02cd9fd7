"""Fused linear + multi-exit cross-entropy on the GPU (``ann_kernels::multi_exit_linear_ce_fwd``;
same outputs and semantics as ``csrc/cpu/multi_exit_linear_ce.cpp``).

The design of Liger-Kernel's ``fused_linear_cross_entropy_forward``
(``src/liger_kernel/ops/fused_linear_cross_entropy.py``): the GEMMs go to the vendor
library, Triton does only the row-parallel part. Apple's cut-cross-entropy
(``apple/ml-cross-entropy``) fuses the logits GEMM into its kernels instead; we keep the
GEMMs in cuBLAS (tensor cores in the input dtype, whatever the GPU) and take from CCE the
rule that nothing of size K x N x V is ever stored. The flattened active rows (exit,
token) go in chunks of R rows whose logits [R, V] fit the chunk budget
(:func:`~ann_kernels.ops.linear_ce_args.gpu_chunk_budget_bytes`; a shared head stacks
several exits per chunk):

  1. logits = h_chunk @ W^T (+ b): ``torch.mm`` / ``torch.addmm`` in the input dtype
     (cuBLAS; bf16 / fp16 on tensor cores with fp32 accumulation, fp32 as torch's own
     matmuls: TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32``);
  2. ``_linear_ce_row_kernel``, one program per row (int64 row offsets): the online row
     statistics over vocabulary blocks (max, rescaled sum of exp, first argmax, sum, target
     logit) in fp32 -> lse, loss (label smoothing, z-loss), confidence, prediction; with
     gradients a second sweep writes the softmax part of the gradient
     g_soft = scale ((1 + 2 z lse) softmax - e/V) over the logits, in place, in the input
     dtype (0 on ignored rows);
  3. grad_h_chunk = g_soft @ W and grad_W += g_soft^T @ h_chunk (cuBLAS, input dtype),
     grad_b += sum_r g_soft (fp32); the one-hot part -scale (1-e) onehot(y), which carries
     the large entries, is added in fp32 (W's target rows for grad_h; per target row of
     grad_W and grad_b after the last chunk) and rounded once: see
     ``csrc/cpu/multi_exit_linear_ce_lowp.h`` for why (bf16 accumulation of the whole
     gradient over 16 chunks gives 2.3x torch's error).

Targets are checked on the host before any launch (a ValueError naming the token, never a
device assert: that would leave the CUDA context broken). A row whose logits are not all
finite gives a NaN loss (valid rows) and NaN gradients, as on CPU; the AdaLoss EMA skips
a non-finite per-exit loss.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ann_kernels.ops.linear_ce_args import check_linear_ce_targets, gpu_chunk_budget_bytes, validate_linear_ce_args
from ann_kernels.ops.multi_exit_ce import update_ema_

__all__ = ["multi_exit_linear_ce_fwd_triton"]


# Reductions through tl.reduce with combiners of this module (tl.max / tl.sum / tl.argmax
# are @triton.jit helpers of triton.language.standard, which the interpreter cannot call
# when triton was imported before TRITON_INTERPRET=1; the compiled code is the same).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max_first_index(value1, index1, value2, index2):
    first = (value1 > value2) | ((value1 == value2) & (index1 < index2))
    return tl.where(first, value1, value2), tl.where(first, index1, index2)


@triton.jit
def _linear_ce_row_kernel(
    z_ptr, stride_z, y_ptr, scale_ptr, loss_ptr, conf_ptr, pred_ptr, V, ignore_index, eps, zcoef,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per logits row; offsets in int64 (rows * stride passes 2^31 at large V).
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    y = tl.load(y_ptr + row)
    # 1. Online statistics over vocabulary blocks (fp32).
    m = -float("inf")
    s = 0.0
    sx = 0.0
    xt = 0.0
    am = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(z_row + cols, mask=ok, other=-float("inf")).to(tl.float32)
        bmax, barg = tl.reduce((x, cols), 0, _max_first_index)
        m_new = tl.maximum(m, bmax)
        s = s * tl.exp(m - m_new) + tl.reduce(tl.exp(x - m_new), 0, _add)
        am = tl.where(bmax > m, barg, am)
        m = m_new
        sx += tl.reduce(tl.where(ok, x, 0.0), 0, _add)
        xt += tl.reduce(tl.where(cols == y, x, 0.0), 0, _add)
    # 2. Row results; a non-finite row has a NaN lse and so a NaN loss (kept, never zeroed).
    lse = m + tl.log(s)
    valid = y != ignore_index
    loss = (1.0 - eps) * (lse - xt) + eps * (lse - sx / V) + zcoef * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(conf_ptr + row, 1.0 / s)
    tl.store(pred_ptr + row, am.to(tl.int64))
    # 3. The softmax part of the gradient, in place in the input dtype.
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row)
        amp = scale * (1.0 + 2.0 * zcoef * lse)
        off = scale * eps / V
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * amp - off
            g = tl.where(scale == 0.0, 0.0, g)
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=ok)


def _block_v(on_gpu: bool, V: int) -> int:
    if on_gpu:
        return min(4096, triton.next_power_of_2(V))
    return 16  # the interpreter: small blocks, several blocks even on tiny vocabularies


def multi_exit_linear_ce_fwd_triton(hidden, weight, target, weights, bias, sample_weights, ignore_index,
                                    label_smoothing, z_loss, ema, momentum, active, budget_bytes, compute_grad):
    """The ``multi_exit_linear_ce_fwd`` outputs (see ``csrc/ops.cpp``) for CUDA tensors (or
    CPU tensors under ``TRITON_INTERPRET=1``): loss [] f32, per_exit [K] f32, per_sample,
    confidence [K, N] f32, prediction [K, N] i64, and with ``compute_grad`` grad_hidden
    [K, N, H], grad_weight (W's shape), grad_bias (b's shape) in the input dtype."""
    validate_linear_ce_args(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss, ema,
                            momentum, check_values=False)
    K, (N, H) = len(hidden), hidden[0].shape
    V = weight.shape[-2]
    dev, dtype = hidden[0].device, hidden[0].dtype
    on_gpu = dev.type == "cuda"
    # 1. Targets on the host, before any launch (a Python error, no device assert).
    check_linear_ce_targets(target, V, ignore_index)
    f32 = dict(dtype=torch.float32, device=dev)
    per_exit_head = weight.dim() == 3
    valid = target != ignore_index
    n_valid = valid.sum().clamp(min=1).float()
    w32 = weights.detach().to(device=dev, dtype=torch.float32)
    s32 = None if sample_weights is None else sample_weights.detach().float()
    nan = float("nan")
    per_sample = torch.zeros(K, N, **f32)  # exits not computed: 0 (per_exit NaN)
    confidence = torch.full((K, N), nan, **f32)
    prediction = torch.full((K, N), -1, dtype=torch.int64, device=dev)
    gdt = dict(dtype=dtype, device=dev)
    gh = torch.zeros(K, N, H, **gdt) if compute_grad else torch.empty(0, **f32)
    gw = torch.zeros(weight.shape, **gdt) if compute_grad else torch.empty(0, **f32)
    gb32 = torch.zeros(bias.shape, **f32) if (compute_grad and bias is not None) else None
    W = weight.detach().contiguous()
    B = None if bias is None else bias.detach().contiguous()
    split = per_exit_head or (bias is not None and bias.dim() == 2)
    eps, zc = float(label_smoothing), float(z_loss)
    block_v = _block_v(on_gpu, V)
    guard = torch.cuda.device(dev) if on_gpu else contextlib.nullcontext()
    if active:
        A = len(active)
        act = torch.tensor(list(active), device=dev)
        total = A * N
        budget = budget_bytes if budget_bytes > 0 else gpu_chunk_budget_bytes(total, V, weight.element_size(), dev)
        rows_per_chunk = max(1, budget // (weight.element_size() * V))
        # Flattened active rows: (slot a, token i) -> row a * N + i.
        h_all = torch.stack([hidden[k].detach() for k in active]).reshape(total, H)
        y_all = target.repeat(A)
        ok_all = valid.repeat(A)
        sw = torch.ones(A, N, **f32) if s32 is None else (s32.expand(A, N) if s32.dim() == 1 else s32[act])
        scale_all = torch.where(valid[None, :], w32[act][:, None] * sw / n_valid, 0.0).reshape(-1).contiguous()
        coef_all = scale_all * (1.0 - eps)  # the one-hot part's weight per row (0 when ignored)
        y_safe = torch.where(ok_all, y_all, 0)
        if compute_grad:  # grad_W's one-hot part, per (head, target) row, in fp32
            slot_head = act if per_exit_head else torch.zeros_like(act)
            keys_w = (slot_head.repeat_interleave(N) * V + y_safe)
            uniq_w, inv_w = torch.unique(keys_w, return_inverse=True)
            acc_w = torch.zeros(uniq_w.numel(), H, **f32)
            keys_b = (act.repeat_interleave(N) * V if (B is not None and B.dim() == 2) else 0) + y_safe
        r0 = 0
        with guard:
            while r0 < total:
                R = min(rows_per_chunk, total - r0)
                if split:
                    R = min(R, (r0 // N + 1) * N - r0)
                k0 = active[r0 // N]
                h = h_all[r0:r0 + R]
                Wk = W[k0] if per_exit_head else W
                bk = None if B is None else (B[k0] if B.dim() == 2 else B)
                # 2. The chunk's logits from cuBLAS, in the input dtype.
                z = torch.mm(h, Wk.t()) if bk is None else torch.addmm(bk, h, Wk.t())
                loss, conf = torch.empty(R, **f32), torch.empty(R, **f32)
                pred = torch.empty(R, dtype=torch.int64, device=dev)
                _linear_ce_row_kernel[(R,)](
                    z, z.stride(0), y_all[r0:r0 + R], scale_all[r0:r0 + R], loss, conf, pred, V, ignore_index, eps,
                    zc, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=8 if on_gpu else 1)
                rows = torch.arange(r0, r0 + R, device=dev)
                ks, iis = act[rows // N], rows % N
                per_sample[ks, iis] = loss
                confidence[ks, iis] = conf
                prediction[ks, iis] = pred
                if compute_grad:
                    # 3. Gradient GEMMs through cuBLAS; the one-hot part in fp32.
                    coef = coef_all[r0:r0 + R]
                    gh_rows = torch.mm(z, Wk).float() - coef[:, None] * Wk[y_safe[r0:r0 + R]].float()
                    gh[ks, iis] = gh_rows.to(dtype)
                    (gw[k0] if per_exit_head else gw).addmm_(z.t(), h)
                    if gb32 is not None:
                        (gb32[k0] if gb32.dim() == 2 else gb32).add_(z.sum(0, dtype=torch.float32))
                    acc_w.index_add_(0, inv_w[r0:r0 + R], torch.where(coef[:, None] != 0, coef[:, None] * h.float(), 0.0))
                r0 += R
            if compute_grad:
                gw_rows = gw.view(-1, H)
                gw_rows[uniq_w] = (gw_rows[uniq_w].float() - acc_w).to(dtype)
                if gb32 is not None:
                    gb32.view(-1).index_add_(0, keys_b, -coef_all)
    # 4. Per-exit means L_k = sum_i s_ik l_ik / N_valid over the computed exits (NaN rows
    #    stay NaN); exits not computed: NaN, and no part of the loss.
    per_exit = torch.full((K,), nan, **f32)
    loss = torch.zeros((), **f32)
    if active:
        s_full = torch.ones(K, N, **f32) if s32 is None else s32.expand(K, N)
        per_exit[act] = (s_full[act] * per_sample[act]).sum(1) / n_valid
        loss = (w32[act] * per_exit[act]).sum()
    if ema is not None:
        update_ema_(ema, per_exit, momentum)
    gb = gb32.to(dtype) if gb32 is not None else torch.empty(0, **f32)
    return loss, per_exit, per_sample, confidence, prediction, gh, gw, gb
