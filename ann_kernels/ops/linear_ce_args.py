"""Argument checks and chunk budgets of the fused linear + multi-exit cross-entropy, shared
by its dispatcher (``ann_kernels/ops/multi_exit_linear_ce.py``) and its Triton launcher
(``ann_kernels/triton/multi_exit_linear_ce.py``), so neither imports the other (the C++
kernel has the same checks and messages in ``csrc/cpu/multi_exit_linear_ce.cpp``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ann_kernels import _compat

__all__ = [
    "as_exit_list", "check_linear_ce_targets", "default_budget_bytes", "gpu_chunk_budget_bytes",
    "validate_linear_ce_args",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEFAULT_TILE_ELEMENTS = 16 * 2**20


def default_budget_bytes(elem_size: int = 2, logits_elements: int = 0) -> int:
    """Bytes of the logits tile the CPU kernel keeps at once (one chunk of rows x one tile
    of the vocabulary, in the input dtype of ``elem_size`` bytes) for a call whose K x N x V
    logits have ``logits_elements`` elements: ``ANN_KERNELS_LINEAR_CE_BUDGET_MB`` when set
    (the C++ kernel reads the same variable), else 16 Mi logits (32 MiB in bf16 / fp16,
    64 MiB in fp32: about 0.13x the logits at (4, 1024, 256, 32000) either way) or 1/8 of
    the call's logits when that is more (large vocabularies: fewer chunks, so W is packed
    and grad_W read and written fewer times). With the whole vocabulary in one tile when
    >= 64 rows fit, else vocabulary tiles of 64 rows."""
    if "ANN_KERNELS_LINEAR_CE_BUDGET_MB" in os.environ:
        return int(float(os.environ["ANN_KERNELS_LINEAR_CE_BUDGET_MB"]) * 2**20)
    return max(_DEFAULT_TILE_ELEMENTS, logits_elements // 8) * elem_size


def gpu_chunk_budget_bytes(total_rows: int, vocab: int, elem_size: int, device: torch.device) -> int:
    """Bytes of one chunk's logits [R, V] on the GPU (the only buffer that scales with R x V):
    ``ANN_KERNELS_LINEAR_CE_BUDGET_MB`` when set, else 1/16 of the K x N x V logits in the
    input dtype (the GPU memory target is <= 0.1x of them), at least 64 rows and 16 MiB
    (small problems: one chunk) and at most 1/32 of the device's memory. Liger sizes its
    chunks the same way (``fused_linear_cross_entropy_forward``: logits chunk ~ the input's
    size), Apple's cut-cross-entropy never stores more than one block."""
    if "ANN_KERNELS_LINEAR_CE_BUDGET_MB" in os.environ:
        return default_budget_bytes()
    logits = total_rows * vocab * elem_size
    budget = max(logits // 16, 64 * vocab * elem_size, 16 * 2**20)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory // 32)
    return int(budget)


def as_exit_list(hidden) -> list[torch.Tensor]:
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() != 3:
            raise ValueError(f"hidden: a single tensor must be stacked exits [K, N, H], got shape {tuple(hidden.shape)}")
        return list(hidden.unbind(0))
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"hidden: expected K tensors [N, H] or one [K, N, H] tensor, got {type(hidden).__name__}")
    exits = list(hidden)
    if not exits:
        raise ValueError("hidden: expected at least one exit, got 0")
    return exits


def validate_linear_ce_args(hidden, weight, target, weights, bias, sample_weights, label_smoothing, z_loss, ema, momentum,
              *, check_values: bool = True):
    """Every argument check (same messages as the C++ op). Returns (exits, weights)."""
    op = "multi_exit_linear_cross_entropy: "
    exits = as_exit_list(hidden)
    first = exits[0]
    for k, h in enumerate(exits):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{op}hidden[{k}]: expected a tensor, got {type(h).__name__}")
        if h.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}hidden[{k}]: expected float32, bfloat16 or float16, got {h.dtype}")
        if h.dim() != 2:
            raise ValueError(f"{op}hidden[{k}]: expected shape [N, H], got {tuple(h.shape)}")
        if h.shape != first.shape:
            raise ValueError(f"{op}hidden[{k}] has shape {tuple(h.shape)} but hidden[0] has {tuple(first.shape)}")
        if h.dtype != first.dtype:
            raise TypeError(f"{op}hidden[{k}] has dtype {h.dtype} but hidden[0] has {first.dtype}")
    num_exits = len(exits)
    n, width = first.shape
    if n == 0:
        raise ValueError(f"{op}hidden: no tokens (N = 0)")
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}weight: expected one shared head [V, H] or one head per exit [K, V, H], got {got}")
    if weight.dtype != first.dtype:
        raise TypeError(f"{op}weight has dtype {weight.dtype} but hidden has {first.dtype}")
    if weight.dim() == 3 and weight.shape[0] != num_exits:
        raise ValueError(f"{op}weight: a per-exit head [K, V, H] needs K = {num_exits} (the number of exits in "
                         f"hidden), got K = {weight.shape[0]} (shape {tuple(weight.shape)})")
    vocab = weight.shape[-2]
    if weight.shape[-1] != width:
        raise ValueError(f"{op}weight: hidden width H = {width} but weight has width {weight.shape[-1]} "
                         f"(shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) not in ((vocab,), (num_exits, vocab)):
        raise ValueError(f"{op}bias: expected shape [{vocab}] or [{num_exits}, {vocab}] (vocabulary size "
                         f"V = {vocab}), got {tuple(bias.shape)}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"{op}target: expected int64 class indices, got {got}")
    if target.shape != (n,):
        raise ValueError(f"{op}target: expected shape [{n}] (one class per token), got {tuple(target.shape)}")
    if weights is None:
        weights = torch.ones(num_exits, device=first.device)
    elif not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float32, device=first.device)
    if weights.shape != (num_exits,):
        raise ValueError(f"{op}weights: expected {num_exits} values (one per exit), got shape {tuple(weights.shape)}")
    if check_values and weights.device.type == "cpu" and not _compat.is_compiling() and bool((weights < 0).any()):
        raise ValueError(f"{op}weights: must be non-negative, got {weights.tolist()}")
    if sample_weights is not None:
        if tuple(sample_weights.shape) not in ((n,), (num_exits, n)):
            raise ValueError(f"{op}sample_weights: expected shape [{n}] or [{num_exits}, {n}], "
                             f"got {tuple(sample_weights.shape)}")
        if not sample_weights.dtype.is_floating_point:
            raise TypeError(f"{op}sample_weights: expected a float tensor, got {sample_weights.dtype}")
    if ema is not None and (ema.dtype != torch.float32 or ema.shape != (num_exits,)):
        raise ValueError(f"{op}ema: expected a float32 tensor of shape [{num_exits}], got {ema.dtype} "
                         f"of shape {tuple(ema.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if not (z_loss >= 0.0 and z_loss < float("inf")):
        raise ValueError(f"{op}z_loss: expected a finite value >= 0, got {z_loss}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{op}momentum: expected a value in [0, 1), got {momentum}")
    return exits, weights


def check_linear_ce_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"multi_exit_linear_cross_entropy: target[{i}] = {int(target[i])} is out of range for a "
                         f"vocabulary of {vocab} (expected 0 <= target < {vocab} or ignore_index = {ignore_index})")
