"""Fused multi-exit cross-entropy: the pure-torch reference, the dispatch, and the
torch.library registrations (fake kernels; the CUDA kernel is Triton).

Naming chain: ``_multi_exit_ce_fwd_kernel`` / ``_multi_exit_ce_bwd_kernel`` (Triton,
``ann_kernels/triton/multi_exit_ce.py``) and ``multi_exit_ce_forward_cpu`` /
``multi_exit_ce_backward_cpu`` (C++, ``csrc/cpu/multi_exit_ce.cpp``) -> backend ops
``_multi_exit_ce_forward`` / ``_multi_exit_ce_backward`` / ``_multi_exit_ce_scale_`` -> op
``torch.ops.ann_kernels.multi_exit_ce`` (argument check + autograd, in C++) -> functional
``multi_exit_cross_entropy`` (here) -> module ``ann_kernels.AnytimeLoss``.

Math (``shared/DESIGN.md``): for exits k, rows i with target y_i != ignore_index,
    l_ik = (1-e)(lse(z_ik) - z_ik[y_i]) + e(lse(z_ik) - mean_c z_ikc)
    L_k  = sum_i l_ik / N_valid   (0 when N_valid = 0; ``per_exit``, unweighted)
    loss = sum_k w_k sum_i s_ik l_ik / N_valid   (s = sample weights, 1 by default)
Gradients: dz_ikc = grad_out w_k s_ik / N_valid (softmax_c - (1-e)[c = y_i] - e/C);
dw_k = grad_out sum_i s_ik l_ik / N_valid (= grad_out L_k without sample weights);
ds_ik = grad_out w_k l_ik / N_valid (summed over k for [N] sample weights).

Backward for any grad_out (GradScaler's 2^16, ``loss / accumulation_steps``): the gradient
buffer (docs/low_precision.md gives the design and the error bound). The forward keeps the
pre-scaled gradient in the logits dtype (one read of the logits + one write of the gradient
in all), handed over as is for grad_out = 1 and scaled in place otherwise (the same buffer,
released with it): exact for powers of two, else one more rounding, within 2 units of the
dtype's rounding. bf16 has fp32's exponent range, so nothing over- or underflows that the
true gradient keeps; fp16's buffer is stored times an exact power of two 2^m (largest
possible entry just below 2^15, so no overflow and no needless subnormals) and scaled by
grad_out 2^-m; on plain CPU tensors m follows the last power-of-two grad_out where that is
safe, so a steady GradScaler scale needs no pass over the buffer either. The save-lse
backend (lse only, gradient recomputed in backward) stays available as grad_mode 2.
``create_graph=True`` runs a backward of differentiable torch ops (double backward works).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ann_kernels import _compat
from ann_kernels._ext import HAS_CPP_EXT, HAS_TRITON, warn_fallback

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExitLoss(NamedTuple):
    """Everything one call of :func:`multi_exit_cross_entropy` computes.

    - ``loss``: [] float32, differentiable w.r.t. the logits: sum_k w_k L_k.
    - ``per_exit``: [K] float32, detached: L_k (mean over non-ignored rows).
    - ``per_sample``: [K, N] float32, detached: l_ik (0 on ignored rows).
    - ``confidence``: [K, N] float32: max_c softmax(z_ik)_c.
    - ``prediction``: [K, N] int64: argmax_c z_ikc.
    """

    loss: torch.Tensor
    per_exit: torch.Tensor
    per_sample: torch.Tensor
    confidence: torch.Tensor
    prediction: torch.Tensor


def _as_heads(logits) -> list[torch.Tensor]:
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(
                f"logits: a single tensor must be stacked exits [K, N, C], got shape {tuple(logits.shape)}"
            )
        return list(logits.unbind(0))
    if not isinstance(logits, Sequence):
        raise TypeError(f"logits: expected a sequence of [N, C] tensors or a [K, N, C] tensor, got {type(logits)}")
    heads = list(logits)
    if not heads:
        raise ValueError("logits: expected at least one exit, got 0")
    return heads


def _validate(logits, target, weights, ema, label_smoothing, momentum, *, check_values: bool = True,
              sample_weights=None):
    """Check every argument; return (heads, weights tensor). Raises naming the argument.

    With the extension built, the tensor checks are the C++ ones every path of the op runs
    (``ann_kernels._C.check_multi_exit_ce_inputs``); this Python copy only serves when it is
    missing. ``check_values=False`` skips the checks that read tensor data (negative or NaN
    weights), for fake tensors (the C++ check skips them by itself)."""
    heads = _as_heads(logits)
    if HAS_CPP_EXT and all(isinstance(z, torch.Tensor) for z in heads) and isinstance(target, torch.Tensor):
        from ann_kernels import _C

        if weights is not None and not isinstance(weights, torch.Tensor):
            weights = torch.as_tensor(weights, dtype=torch.float32, device=heads[0].device)
        if sample_weights is not None and not isinstance(sample_weights, torch.Tensor):
            sample_weights = torch.as_tensor(sample_weights, dtype=torch.float32, device=heads[0].device)
        _C.check_multi_exit_ce_inputs(heads, target, weights, sample_weights, float(label_smoothing), ema,
                                      float(momentum))
        if weights is None:
            weights = torch.ones(len(heads), device=heads[0].device)
        elif not weights.dtype.is_floating_point:
            weights = weights.float()
        return heads, weights
    first = heads[0]
    for k, z in enumerate(heads):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"logits[{k}]: expected a tensor, got {type(z)}")
        if z.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"logits[{k}]: expected float32, bfloat16 or float16, got {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"logits[{k}]: expected shape [N, C], got {tuple(z.shape)}")
        if z.shape != first.shape:
            raise ValueError(
                f"logits[{k}] has shape {tuple(z.shape)} but logits[0] has {tuple(first.shape)}: "
                "every exit needs the same batch size N and class count C"
            )
        if z.dtype != first.dtype:
            raise TypeError(f"logits[{k}] has dtype {z.dtype} but logits[0] has {first.dtype}")
        if z.device != first.device:
            raise ValueError(f"logits[{k}] is on {z.device} but logits[0] is on {first.device}")
    n, c = first.shape
    if n == 0:
        raise ValueError("logits: empty batch (N = 0)")
    if c == 0:
        raise ValueError("logits: no classes (C = 0)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected an int64 tensor, got {type(target)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target: expected int64 class indices, got {target.dtype}")
    if target.shape != (n,):
        raise ValueError(f"target: expected shape [{n}] (one class per row), got {tuple(target.shape)}")
    if target.device != first.device:
        raise ValueError(f"target is on {target.device} but logits are on {first.device}")
    num_exits = len(heads)
    if weights is None:
        weights = torch.ones(num_exits, device=first.device)
    else:
        if not isinstance(weights, torch.Tensor):
            weights = torch.as_tensor(weights, dtype=torch.float32, device=first.device)
        if weights.shape != (num_exits,):
            raise ValueError(
                f"weights: expected {num_exits} values (one per exit), got shape {tuple(weights.shape)}"
            )
        if weights.device != first.device:
            raise ValueError(f"weights is on {weights.device} but logits are on {first.device}")
        if not weights.dtype.is_floating_point:
            weights = weights.float()
        # A host read: only for CPU tensors outside tracing (a CUDA check would sync).
        if check_values and weights.device.type == "cpu" and not _compat.is_compiling():
            if bool(weights.isnan().any()):
                raise ValueError(f"weights: must not be NaN, got {weights.tolist()}")
            if bool((weights < 0).any()):
                raise ValueError(f"weights: must be non-negative, got {weights.tolist()}")
    if sample_weights is not None:
        if not isinstance(sample_weights, torch.Tensor) or sample_weights.dtype != torch.float32:
            got = sample_weights.dtype if isinstance(sample_weights, torch.Tensor) else type(sample_weights)
            raise TypeError(f"sample_weights: expected a float32 tensor, got {got}")
        if sample_weights.shape not in ((n,), (num_exits, n)):
            raise ValueError(f"sample_weights: expected shape [{n}] or [{num_exits}, {n}], "
                             f"got {list(sample_weights.shape)}")
    if ema is not None:
        if not isinstance(ema, torch.Tensor) or ema.dtype != torch.float32 or ema.shape != (num_exits,):
            got = f"{ema.dtype} of shape {tuple(ema.shape)}" if isinstance(ema, torch.Tensor) else type(ema)
            raise ValueError(f"ema: expected a float32 tensor of shape [{num_exits}], got {got}")
        if ema.device != first.device:
            raise ValueError(f"ema is on {ema.device} but logits are on {first.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1), got {momentum}")
    return heads, weights


def update_ema_(ema: torch.Tensor, per_exit: torch.Tensor, momentum: float) -> None:
    """AdaLoss running average, in place, no host sync: NaN (unset) entries take the first
    finite L_k; set ones become m * ema + (1 - m) * L_k; a non-finite L_k is skipped."""
    per_exit = per_exit.to(ema.dtype)
    blended = torch.where(ema.isnan(), per_exit, momentum * ema + (1.0 - momentum) * per_exit)
    ema.copy_(torch.where(per_exit.isfinite(), blended, ema))


def multi_exit_cross_entropy_reference(
    logits,
    target: torch.Tensor,
    weights=None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    ema: torch.Tensor | None = None,
    momentum: float = 0.99,
    sample_weights: torch.Tensor | None = None,
) -> ExitLoss:
    """Pure-torch oracle of :func:`multi_exit_cross_entropy` (same arguments and outputs;
    differentiable to any order in the logits, ``weights`` and ``sample_weights``)."""
    heads, weights = _validate(logits, target, weights, ema, label_smoothing, momentum,
                               sample_weights=sample_weights)
    num_classes = heads[0].shape[1]
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target[{i}] = {int(target[i])} is out of range for {num_classes} classes "
            f"(expected 0 <= target < {num_classes} or ignore_index = {ignore_index})"
        )
    per_sample = torch.stack(
        [
            F.cross_entropy(
                z.float(), target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
            )
            for z in heads
        ]
    )
    n_valid = valid.sum().clamp(min=1).to(torch.float32)
    per_exit = per_sample.sum(dim=1) / n_valid
    weighted = per_exit if sample_weights is None else (sample_weights * per_sample).sum(dim=1) / n_valid
    loss = (weights.to(torch.float32) * weighted).sum()
    with torch.no_grad():
        probs = torch.stack([z.float().softmax(dim=-1) for z in heads])
        confidence = probs.amax(dim=-1)
        prediction = torch.stack([z.argmax(dim=-1) for z in heads])
        if ema is not None:
            update_ema_(ema, per_exit, momentum)
    return ExitLoss(loss, per_exit.detach(), per_sample.detach(), confidence, prediction)


def multi_exit_cross_entropy(
    logits,
    target: torch.Tensor,
    weights=None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    ema: torch.Tensor | None = None,
    momentum: float = 0.99,
    sample_weights: torch.Tensor | None = None,
) -> ExitLoss:
    """Weighted sum of the K exits' cross-entropies, fused in one pass over the logits.

    Args:
        logits: K tensors [N, C] (a list; no stacking needed) or one stacked [K, N, C]
            tensor; float32, bfloat16 or float16; any strides.
        target: [N] int64 class indices; rows equal to ``ignore_index`` contribute nothing.
        weights: [K] non-negative exit weights (None = all ones); may require grad
            (d loss / d w_k = sum_i s_ik l_ik / N_valid, i.e. L_k without sample weights).
        sample_weights: optional per-sample weights s, float32 [N] (shared by the exits) or
            [K, N]; may be negative (L2W-DEN's weights with eps > 0.5), never NaN; may
            require grad (d loss / d s_ik = w_k l_ik / N_valid).
            loss = sum_k w_k sum_i s_ik l_ik / N_valid; ``per_exit`` stays the unweighted L_k.
        label_smoothing: e in [0, 1], as in ``F.cross_entropy``.
        ema: optional AdaLoss running averages [K] float32, updated in place: NaN entries
            take the first finite L_k, others become ``momentum * ema + (1 - momentum) * L_k``;
            non-finite L_k are skipped. No host synchronisation.

    Returns:
        :class:`ExitLoss` (loss, per_exit, per_sample, confidence, prediction).

    Equals ``sum_k w_k * F.cross_entropy(z_k, target, ignore_index=..., label_smoothing=...)``
    (0 for an exit when every row is ignored). CPU tensors run the C++ kernel, CUDA
    tensors the Triton kernel, anything else the pure-torch reference.

    Training loops: any grad_out works (GradScaler, ``loss / accumulation_steps``): powers of
    two exactly, others with one more rounding of the stored gradient, fp16 without overflow
    or lost small entries (docs/low_precision.md has the bound); ``create_graph=True`` gives
    correct second derivatives; under ``no_grad`` / ``inference_mode`` no gradient is
    computed. NaN weights: rejected (ValueError) for CPU tensors; on CUDA they are not
    read (that would synchronise) and make the loss and gradients NaN.
    """
    # Fast path: the C++ op checks every argument itself (same messages as _validate),
    # so the Python glue on the hot path stays a few attribute reads.
    if _MULTI_EXIT_CE is not None:
        if isinstance(logits, (list, tuple)):
            heads = logits
        elif isinstance(logits, torch.Tensor) and logits.dim() == 3:
            heads = logits.unbind(0)
        else:
            heads = None
        if heads:
            first = heads[0]
            device_type = first.device.type if isinstance(first, torch.Tensor) else None
            if device_type == "cpu" or (device_type == "cuda" and HAS_TRITON):
                if weights is not None and not isinstance(weights, torch.Tensor):
                    weights = torch.as_tensor(weights, dtype=torch.float32, device=first.device)
                if sample_weights is not None and not isinstance(sample_weights, torch.Tensor):
                    sample_weights = torch.as_tensor(sample_weights, dtype=torch.float32, device=first.device)
                return ExitLoss(*_MULTI_EXIT_CE(heads, target, weights, ignore_index, float(label_smoothing), ema,
                                                float(momentum), sample_weights))
    heads, weights = _validate(logits, target, weights, ema, label_smoothing, momentum, sample_weights=sample_weights)
    device_type = heads[0].device.type
    reason = "the C++ extension is not built" if not HAS_CPP_EXT else f"no kernel for device {device_type!r}"
    warn_fallback("multi_exit_cross_entropy", reason)
    return multi_exit_cross_entropy_reference(
        heads, target, weights, ignore_index=ignore_index, label_smoothing=label_smoothing, ema=ema, momentum=momentum,
        sample_weights=sample_weights,
    )


def empty_grad_cache() -> None:
    """Free the idle gradient buffers the CPU kernel keeps for reuse (buffers >= 1 MiB are
    recycled across steps to avoid page faults; the idle ones never exceed the peak bytes
    in use over the last 8 requests, nor ``ANN_KERNELS_GRAD_CACHE_MB`` when set; see
    docs/low_precision.md, memory notes)."""
    if HAS_CPP_EXT:
        from ann_kernels import _C

        _C.empty_grad_cache()


GRAD_CACHE_STAT_NAMES = ("handed_out", "hits", "idle_bytes", "idle_limit_bytes", "in_use_bytes")


def grad_cache_stats() -> dict[str, int]:
    """Counters and memory of the CPU kernel's gradient-buffer pool:

    - ``handed_out``: every [K, N, C] gradient buffer requested since the process started,
      pooled or not; ``hits``: those served from the cache;
    - ``idle_bytes``: freed buffers the cache holds now (memory outside torch's allocator);
    - ``idle_limit_bytes``: the current bound on ``idle_bytes`` (the peak of pooled bytes in
      use over the last 8 requests, capped by ``ANN_KERNELS_GRAD_CACHE_MB`` when set);
    - ``in_use_bytes``: pooled buffers alive now (gradients not yet freed).

    Zeros without the extension."""
    if not HAS_CPP_EXT:
        return dict.fromkeys(GRAD_CACHE_STAT_NAMES, 0)
    from ann_kernels import _C

    return dict(zip(GRAD_CACHE_STAT_NAMES, _C.grad_cache_stats()))


# ---------------------------------------------------------------------------------------
# torch.library registrations (schemas live in csrc/ops.cpp).

_MULTI_EXIT_CE = torch.ops.ann_kernels.multi_exit_ce.default if HAS_CPP_EXT else None

if HAS_CPP_EXT:

    def _outputs_fake(logits):
        num_exits, (n, _) = len(logits), logits[0].shape
        f32 = dict(dtype=torch.float32, device=logits[0].device)
        return (
            torch.empty((), **f32),
            torch.empty(num_exits, **f32),
            torch.empty(num_exits, n, **f32),
            torch.empty(num_exits, n, **f32),
            torch.empty(num_exits, n, dtype=torch.int64, device=logits[0].device),
        )

    @_compat.register_fake("ann_kernels::multi_exit_ce")
    def _multi_exit_ce_fake(logits, target, weights, ignore_index, label_smoothing, ema, momentum,
                            sample_weights=None):
        # Meta / fake tensors get the same errors as real ones (the check reads no values here).
        from ann_kernels import _C

        _C.check_multi_exit_ce_inputs(list(logits), target, weights, sample_weights, label_smoothing, ema, momentum)
        return _outputs_fake(logits)

    @_compat.register_fake("ann_kernels::multi_exit_ce_fwd")
    def _multi_exit_ce_fwd_fake(logits, target, weights, ignore_index, label_smoothing, ema, momentum, compute_grad):
        out = _multi_exit_ce_fake(logits, target, weights, ignore_index, label_smoothing, ema, momentum)
        n, c = logits[0].shape
        fp32 = compute_grad and logits[0].dtype == torch.float16  # fp16's gradient comes in fp32
        return *out, logits[0].new_empty((len(logits), n, c) if compute_grad else (0,),
                                         dtype=torch.float32 if fp32 else logits[0].dtype)

    @_compat.register_fake("ann_kernels::_multi_exit_ce_forward")
    def _multi_exit_ce_forward_fake(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema,
                                    momentum, grad_mode):
        n, c = logits[0].shape
        lse_shape = (len(logits), n) if grad_mode == 2 else (2,) if grad_mode in (3, 4) else (0,)
        lse = logits[0].new_empty(lse_shape, dtype=torch.float32)
        grads = logits[0].new_empty((len(logits), n, c) if grad_mode in (1, 3, 4) else (0,))
        return *_outputs_fake(logits), lse, grads

    @_compat.register_fake("ann_kernels::_multi_exit_ce_backward")
    def _multi_exit_ce_backward_fake(grad_loss, logits, target, weights, sample_weights, lse, ignore_index,
                                     label_smoothing):
        n, c = logits[0].shape
        return logits[0].new_empty((len(logits), n, c))

    @_compat.register_fake("ann_kernels::_multi_exit_ce_scale_")
    def _multi_exit_ce_scale_fake(grads, grad_loss):
        return None

    if HAS_TRITON:

        @torch.library.register_kernel("ann_kernels::_multi_exit_ce_forward", "cuda")
        def _multi_exit_ce_forward_cuda(logits, target, weights, sample_weights, ignore_index, label_smoothing, ema,
                                        momentum, grad_mode):
            from ann_kernels.triton.multi_exit_ce import multi_exit_ce_forward_triton

            return multi_exit_ce_forward_triton(logits, target, weights, sample_weights, ignore_index,
                                                label_smoothing, ema, momentum, grad_mode)

        @torch.library.register_kernel("ann_kernels::_multi_exit_ce_backward", "cuda")
        def _multi_exit_ce_backward_cuda(grad_loss, logits, target, weights, sample_weights, lse, ignore_index,
                                         label_smoothing):
            from ann_kernels.triton.multi_exit_ce import multi_exit_ce_backward_triton

            return multi_exit_ce_backward_triton(grad_loss, logits, target, weights, sample_weights, lse,
                                                 ignore_index, label_smoothing)

        @torch.library.register_kernel("ann_kernels::_multi_exit_ce_scale_", "cuda")
        def _multi_exit_ce_scale_cuda(grads, grad_loss):
            from ann_kernels.triton.multi_exit_ce import scale_grads_triton

            scale_grads_triton(grads, grad_loss)
