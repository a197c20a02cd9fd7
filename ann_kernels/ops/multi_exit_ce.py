"""Fused multi-exit cross-entropy: the pure-torch reference, the dispatch, and the
torch.library registrations (fake kernels; the CUDA kernel is Triton).

Naming chain: ``_multi_exit_ce_kernel`` (Triton, ``ann_kernels/triton/multi_exit_ce.py``)
and ``multi_exit_ce_fwd_cpu`` (C++, ``csrc/cpu/multi_exit_ce.cpp``) -> op
``torch.ops.ann_kernels.multi_exit_ce`` (autograd in C++) -> functional
``multi_exit_cross_entropy`` (here) -> module ``ann_kernels.AnytimeLoss``.

Math (``shared/DESIGN.md``): for exits k, rows i with target y_i != ignore_index,
    l_ik = (1-e)(lse(z_ik) - z_ik[y_i]) + e(lse(z_ik) - mean_c z_ikc)
    L_k  = sum_i l_ik / N_valid   (0 when N_valid = 0)
    loss = sum_k w_k L_k
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


def _validate(logits, target, weights, ema, label_smoothing, momentum, *, check_values: bool = True):
    """Check every argument; return (heads, weights tensor). Raises naming the argument.
    ``check_values=False`` skips the one check that reads tensor data (negative weights),
    for fake tensors."""
    heads = _as_heads(logits)
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
        if check_values and weights.device.type == "cpu" and not torch.compiler.is_compiling() and bool((weights < 0).any()):
            raise ValueError(f"weights: must be non-negative, got {weights.tolist()}")
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
) -> ExitLoss:
    """Pure-torch oracle of :func:`multi_exit_cross_entropy` (same arguments and outputs)."""
    heads, weights = _validate(logits, target, weights, ema, label_smoothing, momentum)
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
    loss = (weights.to(torch.float32) * per_exit).sum()
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
) -> ExitLoss:
    """Weighted sum of the K exits' cross-entropies, fused in one pass over the logits.

    Args:
        logits: K tensors [N, C] (a list; no stacking needed) or one stacked [K, N, C]
            tensor; float32, bfloat16 or float16; any strides.
        target: [N] int64 class indices; rows equal to ``ignore_index`` contribute nothing.
        weights: [K] non-negative exit weights (None = all ones), treated as constants.
        label_smoothing: e in [0, 1], as in ``F.cross_entropy``.
        ema: optional AdaLoss running averages [K] float32, updated in place: NaN entries
            take the first finite L_k, others become ``momentum * ema + (1 - momentum) * L_k``;
            non-finite L_k are skipped. No host synchronisation.

    Returns:
        :class:`ExitLoss` (loss, per_exit, per_sample, confidence, prediction).

    Equals ``sum_k w_k * F.cross_entropy(z_k, target, ignore_index=..., label_smoothing=...)``
    (0 for an exit when every row is ignored). CPU tensors run the C++ kernel, CUDA
    tensors the Triton kernel, anything else the pure-torch reference.
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
                if weights is None:
                    weights = _ones(len(heads), first.device)
                elif not isinstance(weights, torch.Tensor):
                    weights = torch.as_tensor(weights, dtype=torch.float32, device=first.device)
                return ExitLoss(
                    *_MULTI_EXIT_CE(heads, target, weights, ignore_index, float(label_smoothing), ema, float(momentum))
                )
    heads, weights = _validate(logits, target, weights, ema, label_smoothing, momentum)
    device_type = heads[0].device.type
    reason = "the C++ extension is not built" if not HAS_CPP_EXT else f"no kernel for device {device_type!r}"
    warn_fallback("multi_exit_cross_entropy", reason)
    return multi_exit_cross_entropy_reference(
        heads, target, weights, ignore_index=ignore_index, label_smoothing=label_smoothing, ema=ema, momentum=momentum
    )


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _ones(num_exits: int, device: torch.device) -> torch.Tensor:
    """Cached all-ones weights [K] (the op never writes its weights)."""
    key = (num_exits, device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(num_exits, device=device)
    return ones


def empty_grad_cache() -> None:
    """Free the idle gradient buffers the CPU kernel keeps for reuse (buffers >= 1 MiB are
    recycled across steps to avoid page faults; at most ``ANN_KERNELS_GRAD_CACHE_MB``,
    default 2048, is kept idle)."""
    if HAS_CPP_EXT:
        from ann_kernels import _C

        _C.empty_grad_cache()


# ---------------------------------------------------------------------------------------
# torch.library registrations (schemas live in csrc/ops.cpp).

_MULTI_EXIT_CE = torch.ops.ann_kernels.multi_exit_ce.default if HAS_CPP_EXT else None

if HAS_CPP_EXT:

    @torch.library.register_fake("ann_kernels::multi_exit_ce_fwd")
    def _multi_exit_ce_fwd_fake(logits, target, weights, ignore_index, label_smoothing, ema, momentum, compute_grad):
        loss, per_exit, per_sample, confidence, prediction = _multi_exit_ce_fake(
            logits, target, weights, ignore_index, label_smoothing, ema, momentum
        )
        n, c = logits[0].shape
        grads = logits[0].new_empty((len(logits), n, c) if compute_grad else (0,))
        return loss, per_exit, per_sample, confidence, prediction, grads

    @torch.library.register_fake("ann_kernels::multi_exit_ce")
    def _multi_exit_ce_fake(logits, target, weights, ignore_index, label_smoothing, ema, momentum):
        # Meta / fake tensors get the same errors as real ones.
        _validate(logits, target, weights, ema, label_smoothing, momentum, check_values=False)
        num_exits = len(logits)
        n = logits[0].shape[0]
        f32 = dict(dtype=torch.float32, device=logits[0].device)
        return (
            torch.empty((), **f32),
            torch.empty(num_exits, **f32),
            torch.empty(num_exits, n, **f32),
            torch.empty(num_exits, n, **f32),
            torch.empty(num_exits, n, dtype=torch.int64, device=logits[0].device),
        )

    if HAS_TRITON:

        @torch.library.register_kernel("ann_kernels::multi_exit_ce_fwd", "cuda")
        def _multi_exit_ce_fwd_cuda(logits, target, weights, ignore_index, label_smoothing, ema, momentum, compute_grad):
            from ann_kernels.triton.multi_exit_ce import multi_exit_ce_fwd_triton

            return multi_exit_ce_fwd_triton(
                logits, target, weights, ignore_index, label_smoothing, ema, momentum, compute_grad
            )
