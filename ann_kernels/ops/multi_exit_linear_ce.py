"""Fused linear + multi-exit cross-entropy: K exits' hidden states through one LM head
(or one head per exit) and the weighted sum of their cross-entropies, without ever
materialising the K x N x V logits. The pure-torch reference, the dispatch and the
torch.library registrations (fake kernels; CUDA through Triton).

Naming chain: ``_linear_ce_*_kernel`` (Triton, ``ann_kernels/triton/multi_exit_linear_ce.py``)
and ``linear_ce_fwd_cpu`` (C++, ``csrc/cpu/multi_exit_linear_ce.cpp``) -> op
``torch.ops.ann_kernels.multi_exit_linear_ce`` (autograd in C++) -> functional
:func:`multi_exit_linear_cross_entropy` (here) -> module ``ann_kernels.AnytimeLinearLoss``.

Math (K exits k, tokens i with y_i != ignore_index, N_valid of them; e = label smoothing,
z = z-loss coefficient, s_ik per-token weights, w_k exit weights):
    z_ik   = W_k h_ik + b_k                                  (logits, never stored whole)
    l_ik   = (1-e)(lse(z_ik) - z_ik[y_i]) + e(lse(z_ik) - mean_c z_ikc) + z lse(z_ik)^2
    L_k    = sum_i s_ik l_ik / N_valid                        (0 when N_valid = 0)
    loss   = sum_k w_k L_k
    dloss/dw_k = L_k ; dloss/ds_ik = w_k l_ik / N_valid
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ann_kernels import _compat
from ann_kernels._ext import HAS_CPP_EXT, HAS_TRITON, warn_fallback
from ann_kernels.ops.linear_ce_args import (
    as_exit_list,
    check_linear_ce_targets,
    default_budget_bytes,
    validate_linear_ce_args,
)
from ann_kernels.ops.multi_exit_ce import ExitLoss, update_ema_

__all__ = [
    "multi_exit_linear_cross_entropy", "multi_exit_linear_cross_entropy_reference", "default_budget_bytes",
]

def multi_exit_linear_cross_entropy_reference(
    hidden, weight, target, weights=None, *, bias=None, ignore_index: int = -100, label_smoothing: float = 0.0,
    sample_weights=None, ema=None, momentum: float = 0.99, z_loss: float = 0.0,
    skip_zero_weight_exits: bool = True, memory_budget_mb: float | None = None, dtype: torch.dtype | None = None,
) -> ExitLoss:
    """Pure-torch oracle: ``F.linear`` + ``F.cross_entropy`` per exit (materialises the
    logits; ``memory_budget_mb`` is accepted and ignored). ``dtype`` (e.g. float64) runs
    the math in that precision. Skipped exits (weight exactly 0, host-known) as the op:
    per_exit / confidence NaN, per_sample 0, prediction -1."""
    active = _active_exits(weights, len(as_exit_list(hidden)), skip_zero_weight_exits)
    exits, weights = validate_linear_ce_args(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss,
                               ema, momentum)
    vocab = weight.shape[-2]
    check_linear_ce_targets(target, vocab, ignore_index)
    num_exits, n = len(exits), exits[0].shape[0]
    math_dtype = dtype or torch.float32
    valid = target != ignore_index
    n_valid = valid.sum().clamp(min=1).to(math_dtype)
    nan = float("nan")
    dev = exits[0].device
    per_sample = [torch.zeros(n, dtype=math_dtype, device=dev) for _ in range(num_exits)]
    per_exit = [torch.full((), nan, dtype=math_dtype, device=dev) for _ in range(num_exits)]
    confidence = torch.full((num_exits, n), nan, device=dev)
    prediction = torch.full((num_exits, n), -1, dtype=torch.int64, device=dev)
    loss = torch.zeros((), dtype=math_dtype, device=dev)
    for k in active:
        w_k = weight[k] if weight.dim() == 3 else weight
        b_k = None if bias is None else (bias[k] if bias.dim() == 2 else bias)
        if dtype is None:  # the input dtype's own GEMM (what users get from torch)
            logits = F.linear(exits[k], w_k, b_k).to(math_dtype)
        else:
            logits = F.linear(exits[k].to(dtype), w_k.to(dtype), None if b_k is None else b_k.to(dtype))
        l_k = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              reduction="none")
        if z_loss:
            l_k = l_k + torch.where(valid, z_loss * logits.logsumexp(-1).pow(2), 0.0)
        per_sample[k] = l_k
        s_k = 1.0
        if sample_weights is not None:
            s_k = (sample_weights[k] if sample_weights.dim() == 2 else sample_weights).to(math_dtype)
        per_exit[k] = (s_k * l_k).sum() / n_valid
        loss = loss + weights[k].to(math_dtype) * per_exit[k]
        with torch.no_grad():
            confidence[k] = logits.float().softmax(-1).amax(-1)
            prediction[k] = logits.argmax(-1)
    per_exit_t = torch.stack(per_exit).float().detach()
    if ema is not None:
        with torch.no_grad():
            update_ema_(ema, per_exit_t, momentum)
    return ExitLoss(loss.float() if dtype is None else loss, per_exit_t, torch.stack(per_sample).float().detach(),
                    confidence, prediction)


def _active_exits(weights, num_exits: int, skip_zero: bool) -> list[int]:
    """Exits to compute: all but those whose weight is exactly 0 *and known on the host*
    (a Python sequence, or a CPU tensor that needs no gradient; never a device read)."""
    if not skip_zero or weights is None:
        return list(range(num_exits))
    if isinstance(weights, torch.Tensor):
        if weights.device.type != "cpu" or weights.requires_grad or _compat.is_compiling():
            return list(range(num_exits))
        if weights.shape != (num_exits,):
            return list(range(num_exits))  # the op raises with the message
        values = weights.tolist()
    else:
        values = [float(w) for w in weights]
        if len(values) != num_exits:
            return list(range(num_exits))
    return [k for k, w in enumerate(values) if w != 0.0]


def multi_exit_linear_cross_entropy(
    hidden, weight: torch.Tensor, target: torch.Tensor, weights=None, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, sample_weights: torch.Tensor | None = None,
    ema: torch.Tensor | None = None, momentum: float = 0.99, z_loss: float = 0.0,
    skip_zero_weight_exits: bool = True, memory_budget_mb: float | None = None,
) -> ExitLoss:
    """Weighted sum of K exits' cross-entropies through a shared LM head, fused with the head.

    Args:
        hidden: K tensors [N, H] (one per exit; a list, no stacking needed) or one [K, N, H];
            float32, bfloat16 or float16, any strides.
        weight: [V, H] one head shared by every exit (an ``nn.Linear.weight``) or [K, V, H]
            one head per exit; same dtype as ``hidden``.
        target: [N] int64 next-token ids; ``ignore_index`` tokens contribute nothing.
        weights: [K] non-negative exit weights (None = ones); a tensor may require grad
            (dloss/dw_k = L_k). Exits whose weight is exactly 0 and known on the host (a
            list, or a CPU tensor without grad) are skipped entirely (no GEMM); their
            per_exit and confidence are NaN and prediction -1 (``skip_zero_weight_exits``).
        bias: [V] or [K, V] head bias.
        sample_weights: [N] or [K, N] per-token weights s_ik (may require grad).
        ema: AdaLoss running averages [K] float32, updated in place as in
            :func:`~ann_kernels.multi_exit_cross_entropy`.
        z_loss: adds z * lse^2 per token (PaLM / Liger convention).
        memory_budget_mb: bytes of the logits tile in MiB (CPU default
            :func:`default_budget_bytes`, GPU :func:`gpu_chunk_budget_bytes`).

    Returns:
        :class:`~ann_kernels.ExitLoss` (loss [] f32, per_exit [K], per_sample [K, N]
        unweighted l_ik, confidence [K, N] max-prob, prediction [K, N] argmax).

    CPU tensors run the C++ kernel, CUDA tensors the Triton kernel (cuBLAS GEMMs + a Triton
    row kernel), anything else the pure-torch reference (with a one-time warning).
    bf16 / fp16 inputs run every GEMM in the input dtype (fp32 accumulation inside) and the
    row math in fp32; no fp32 copy of the head exists. Precision and memory:
    ``docs/linear_loss.md``.
    """
    exits = as_exit_list(hidden)
    num_exits = len(exits)
    budget = 0 if memory_budget_mb is None else int(memory_budget_mb * 2**20)
    if memory_budget_mb is not None and budget <= 0:
        raise ValueError(f"memory_budget_mb: expected a positive size, got {memory_budget_mb}")
    active = _active_exits(weights, num_exits, skip_zero_weight_exits)
    first = exits[0] if isinstance(exits[0], torch.Tensor) else None
    device_type = first.device.type if first is not None else None
    if _LINEAR_CE is not None and (device_type == "cpu" or (device_type == "cuda" and HAS_TRITON)):
        if weights is None:
            weights = torch.ones(num_exits, device=first.device)
        elif not isinstance(weights, torch.Tensor):
            weights = torch.as_tensor(weights, dtype=torch.float32, device=first.device)
        elif weights.device != first.device and weights.device.type == "cpu" and not weights.requires_grad:
            weights = weights.to(first.device, non_blocking=True)  # host-known weights (schemes, curricula)
        if isinstance(target, torch.Tensor) and target.dtype.is_floating_point:
            raise TypeError(f"multi_exit_linear_cross_entropy: target: expected int64 class indices, got {target.dtype}")
        return ExitLoss(*_LINEAR_CE(exits, weight, target, weights, bias, sample_weights, int(ignore_index),
                                    float(label_smoothing), float(z_loss), ema, float(momentum), active, budget))
    reason = "the C++ extension is not built" if not HAS_CPP_EXT else f"no kernel for device {device_type!r}"
    warn_fallback("multi_exit_linear_cross_entropy", reason)
    return multi_exit_linear_cross_entropy_reference(
        exits, weight, target, weights, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
        sample_weights=sample_weights, ema=ema, momentum=momentum, z_loss=z_loss,
        skip_zero_weight_exits=skip_zero_weight_exits)


# ---------------------------------------------------------------------------------------
# torch.library registrations (schemas in csrc/ops.cpp).

_LINEAR_CE = torch.ops.ann_kernels.multi_exit_linear_ce.default if HAS_CPP_EXT else None

if HAS_CPP_EXT:

    @_compat.register_fake("ann_kernels::multi_exit_linear_ce")
    def _linear_ce_fake(hidden, weight, target, weights, bias, sample_weights, ignore_index, label_smoothing,
                        z_loss, ema, momentum, active, budget_bytes):
        validate_linear_ce_args(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss, ema, momentum,
                  check_values=False)
        num_exits, n = len(hidden), hidden[0].shape[0]
        f32 = dict(dtype=torch.float32, device=hidden[0].device)
        return (torch.empty((), **f32), torch.empty(num_exits, **f32), torch.empty(num_exits, n, **f32),
                torch.empty(num_exits, n, **f32),
                torch.empty(num_exits, n, dtype=torch.int64, device=hidden[0].device))

    @_compat.register_fake("ann_kernels::multi_exit_linear_ce_fwd")
    def _linear_ce_fwd_fake(hidden, weight, target, weights, bias, sample_weights, ignore_index, label_smoothing,
                            z_loss, ema, momentum, active, budget_bytes, compute_grad):
        outs = _linear_ce_fake(hidden, weight, target, weights, bias, sample_weights, ignore_index,
                               label_smoothing, z_loss, ema, momentum, active, budget_bytes)
        f32 = dict(dtype=torch.float32, device=hidden[0].device)
        num_exits, (n, width) = len(hidden), hidden[0].shape
        if compute_grad:  # fp32 inputs: fp32 gradients; bf16 / fp16: the input dtype
            g = dict(dtype=hidden[0].dtype, device=hidden[0].device)
            grads = (torch.empty(num_exits, n, width, **g), torch.empty(weight.shape, **g),
                     torch.empty(bias.shape, **g) if bias is not None else torch.empty(0, **f32))
        else:
            grads = tuple(torch.empty(0, **f32) for _ in range(3))
        return (*outs, *grads)

    if HAS_TRITON:

        @torch.library.register_kernel("ann_kernels::multi_exit_linear_ce_fwd", "cuda")
        def _linear_ce_fwd_cuda(hidden, weight, target, weights, bias, sample_weights, ignore_index,
                                label_smoothing, z_loss, ema, momentum, active, budget_bytes, compute_grad):
            from ann_kernels.triton.multi_exit_linear_ce import multi_exit_linear_ce_fwd_triton

            return multi_exit_linear_ce_fwd_triton(hidden, weight, target, weights, bias, sample_weights,
                                                   ignore_index, label_smoothing, z_loss, ema, momentum, active,
                                                   budget_bytes, compute_grad)
