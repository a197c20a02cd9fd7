"""One early-exit decision: the pure-torch reference, the dispatch, and the torch.library
registrations of ``ann_kernels::early_exit_step`` (schema in ``csrc/ops.cpp``).

Naming chain: ``early_exit_step_cpu`` (``csrc/cpu/early_exit.cpp``) and the CUDA kernels
(``csrc/cuda/early_exit_kernel.cu`` + ``csrc/cuda/early_exit.cpp``) -> op
``torch.ops.ann_kernels.early_exit_step`` -> functional :func:`early_exit_step` (here) ->
:class:`ann_kernels.EarlyExitEngine` (which calls the op through the direct binding
``ann_kernels._C.early_exit_step`` to save ~5 us of Python boxing per stage).

Semantics, for the M still-active samples of a batch of N (original positions
``active_index`` [M]) and their logits [M, C] at one exit:

- confidence by criterion (higher = more confident; row math in
  ``csrc/include/ann_kernels/early_exit.h``):
  ``max_prob`` = max_c softmax(z)_c; ``margin`` = top-1 minus top-2 probability;
  ``entropy`` = 1 - H(softmax(z)) / log C (1 for C = 1);
- non-finite logits, one rule on every backend (reference, CPU, CUDA): ``torch.softmax`` of
  a row is NaN exactly when the row maximum is not finite (a NaN; a +inf, as inf - inf is
  NaN; every logit -inf), and then the confidence is NaN on every criterion; -inf logits
  beside a finite maximum are probability 0. Finite rows give confidences in [0, 1];
- threshold mode (``exit_count`` None / -1): a row exits when confidence >= threshold
  (compared in float32), which a NaN confidence never is; threshold -inf makes every row
  exit (NaN confidences too: the last exit, a deadline), +inf none;
- quota mode (``exit_count`` >= 0): the ``exit_count`` most confident rows exit (ties by row
  order; a count above M means all rows), NaN confidences excluded: so a row with a NaN
  or +inf logit never exits before the last exit;
- exiting rows get prediction = argmax (torch's first-maximum rule), exit_index = exit_id
  and their confidence, written into the [N] buffers at their original positions;
- returns the survivors' original positions [R], their row numbers in this call
  (``keep_local`` [R]) and the survivors' rows of ``hidden`` as a new [R, ...] tensor in
  hidden's memory format (channels_last in, channels_last out; :func:`gathered_hidden_empty`).

Tuple hidden states: the op gathers one tensor (the first); gather the others with
``t.index_select(0, keep_local)``. One tensor, not ``Tensor[]``, because functionalization
(torch.compile) rejects list outputs of an op that mutates its inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ann_kernels import _compat
from ann_kernels._ext import HAS_CPP_EXT, warn_fallback

__all__ = [
    "CRITERIA",
    "ExitStep",
    "buffers_function",
    "criterion_code",
    "early_exit_step",
    "early_exit_step_reference",
    "exit_confidence",
    "exit_confidence_reference",
    "output_buffers",
    "step_function",
]

#: Confidence criteria and their codes in the C++/CUDA kernels (``ExitCriterion``).
CRITERIA = {"max_prob": 0, "entropy": 1, "margin": 2}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP_NAME = "ann_kernels::early_exit_step"


class ExitStep(NamedTuple):
    """Results of one :func:`early_exit_step` call (R = number of surviving rows).

    - ``survivor_index``: [R] int64, original positions of the rows that continue.
    - ``keep_local``: [R] int64, their row numbers among the M rows of this call.
    - ``hidden``: [R, ...] the survivors' rows of ``hidden`` (a new tensor), or an empty
      [0] tensor when no hidden state was given.
    """

    survivor_index: torch.Tensor
    keep_local: torch.Tensor
    hidden: torch.Tensor


def criterion_code(criterion: str | int) -> int:
    """The kernel code of a criterion name (``max_prob``, ``entropy``, ``margin``)."""
    if isinstance(criterion, str) and criterion in CRITERIA:
        return CRITERIA[criterion]
    if isinstance(criterion, int) and not isinstance(criterion, bool) and criterion in CRITERIA.values():
        return criterion
    raise ValueError(f"criterion: expected one of {sorted(CRITERIA)}, got {criterion!r}")


_KERNEL_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_has_kernel_cache: dict[str, bool] = {}


def has_kernel(device_type: str) -> bool:
    """True when the compiled op has a kernel for tensors on ``device_type`` ('cpu', 'cuda').
    Cached: the dispatcher query costs ~40 us, and registrations do not change at run time."""
    cached = _has_kernel_cache.get(device_type)
    if cached is None:
        key = _KERNEL_KEYS.get(device_type)
        cached = HAS_CPP_EXT and key is not None and _compat.has_kernel_for(_OP_NAME, key)
        _has_kernel_cache[device_type] = cached
    return cached


# ---------------------------------------------------------------------------------------
# Pure-torch reference (the oracle of the tests, and the fallback).


def exit_confidence_reference(logits: torch.Tensor, criterion: str | int = "max_prob"):
    """Confidence [M] float32 and prediction [M] int64 of every row of ``logits`` [M, C]:
    from ``torch.softmax`` in float32, NaN wherever torch's softmax row is NaN (the
    non-finite rule of the module docstring), clamped to [0, 1] elsewhere."""
    code = criterion_code(criterion)
    z = logits.float()
    num_classes = z.shape[-1]
    log_probs = z.log_softmax(dim=-1)
    probs = log_probs.exp()
    if code == CRITERIA["max_prob"]:
        confidence = probs.amax(dim=-1)
    elif code == CRITERIA["margin"]:
        if num_classes == 1:
            confidence = probs[:, 0]
        else:
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
    else:
        if num_classes == 1:
            confidence = torch.ones_like(z[:, 0])
        else:
            entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)
            confidence = 1.0 - entropy / math.log(num_classes)
    softmax_is_nan = probs.isnan().any(dim=-1)
    confidence = torch.where(softmax_is_nan, torch.full_like(confidence, math.nan), confidence.clamp(0.0, 1.0))
    return confidence, logits.argmax(dim=-1)


def early_exit_step_reference(
    logits,
    active_index,
    hidden,
    prediction,
    exit_index,
    confidence,
    threshold,
    criterion,
    exit_id,
    exit_count=-1,
) -> ExitStep:
    """Pure-torch oracle of the op: same positional arguments, same buffer writes and results."""
    row_conf, row_pred = exit_confidence_reference(logits, criterion)
    num_rows = logits.shape[0]
    if exit_count is None or exit_count < 0:
        thr = torch.tensor(threshold, dtype=torch.float32)
        if threshold == -math.inf:
            exits = torch.ones(num_rows, dtype=torch.bool, device=logits.device)
        else:
            exits = row_conf >= thr.to(logits.device)
    else:
        count = min(int(exit_count), num_rows)
        eligible = ~row_conf.isnan()
        key = torch.where(eligible, row_conf, torch.full_like(row_conf, -math.inf))
        order = torch.sort(key, descending=True, stable=True).indices[:count]
        exits = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
        exits[order] = True
        exits &= eligible
    positions = active_index[exits]
    prediction[positions] = row_pred[exits]
    exit_index[positions] = exit_id
    confidence[positions] = row_conf[exits]
    keep_local = (~exits).nonzero().squeeze(1)
    if hidden is None:
        gathered = logits.new_empty(0)
    else:
        gathered = gathered_hidden_empty(hidden, keep_local.shape[0])
        gathered.copy_(hidden.index_select(0, keep_local))
    return ExitStep(active_index[keep_local], keep_local, gathered)


def _has_batch_row_blocks(t: torch.Tensor, row_elems: int) -> bool:
    """Every batch row of ``t`` is one dense block of ``row_elems`` elements (the inner dims,
    ordered by stride, tile it exactly): csrc/hidden_rows.h's has_batch_row_blocks."""
    if t.shape[0] > 1 and t.stride(0) != row_elems:
        return False
    expected = 1
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(1, t.dim()) if t.shape[d] != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def gathered_hidden_empty(hidden: torch.Tensor, rows) -> torch.Tensor:
    """An uninitialised [rows, ...] tensor laid out as the kernels lay out the gathered hidden
    state (csrc/hidden_rows.h): when every batch row of ``hidden`` is one dense block
    (contiguous, channels_last, channels_last_3d, ...), hidden's own strides; otherwise those
    of hidden made dense in its suggested memory format. ``rows`` may be symbolic."""
    inner = hidden.shape[1:]
    row_elems = math.prod(inner)
    source = hidden
    if not _has_batch_row_blocks(hidden, row_elems):
        source = hidden.contiguous(memory_format=_compat.suggest_memory_format(hidden))
    strides = (row_elems if row_elems > 0 else source.stride(0), *source.stride()[1:])
    return hidden.new_empty_strided((rows, *inner), strides)


# ---------------------------------------------------------------------------------------
# Dispatch.


def _validate_step(logits, active_index, hidden, prediction, exit_index, confidence, threshold, exit_count):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"logits: expected a [M, C] tensor, got {got}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits: expected float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits: no classes (C = 0)")
    num_rows, device = logits.shape[0], logits.device
    if (
        not isinstance(active_index, torch.Tensor)
        or active_index.dtype != torch.int64
        or active_index.shape != (num_rows,)
    ):
        got = (
            f"{active_index.dtype} {tuple(active_index.shape)}"
            if isinstance(active_index, torch.Tensor)
            else type(active_index)
        )
        raise ValueError(f"active_index: expected an int64 tensor of shape [{num_rows}], got {got}")
    for name, buf, dtype in (
        ("prediction", prediction, torch.int64),
        ("exit_index", exit_index, torch.int64),
        ("confidence", confidence, torch.float32),
    ):
        if (
            not isinstance(buf, torch.Tensor)
            or buf.dtype != dtype
            or buf.dim() != 1
            or not buf.is_contiguous()
        ):
            got = f"{buf.dtype} {tuple(buf.shape)}" if isinstance(buf, torch.Tensor) else type(buf)
            raise ValueError(f"{name}: expected a contiguous 1-D {dtype} tensor, got {got}")
        if buf.shape != prediction.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(prediction.shape)} like prediction, got {tuple(buf.shape)}"
            )
        if buf.device != device:
            raise ValueError(f"{name} is on {buf.device} but logits are on {device}")
    if active_index.device != device:
        raise ValueError(f"active_index is on {active_index.device} but logits are on {device}")
    if hidden is not None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() == 0 or hidden.shape[0] != num_rows:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)
            raise ValueError(f"hidden: expected a tensor with batch dim 0 of size M = {num_rows}, got {got}")
        if hidden.device != device:
            raise ValueError(f"hidden is on {hidden.device} but logits are on {device}")
    if isinstance(threshold, torch.Tensor):
        threshold = float(threshold)
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold: expected a number (not NaN; +-inf allowed), got {threshold!r}")
    if exit_count is not None and (not isinstance(exit_count, int) or exit_count < 0):
        raise ValueError(f"exit_count: expected None (threshold mode) or an int >= 0, got {exit_count!r}")
    return float(threshold), -1 if exit_count is None else int(exit_count)


def early_exit_step(
    logits: torch.Tensor,
    active_index: torch.Tensor,
    hidden: torch.Tensor | None,
    prediction: torch.Tensor,
    exit_index: torch.Tensor,
    confidence: torch.Tensor,
    *,
    threshold: float = -math.inf,
    criterion: str = "max_prob",
    exit_id: int = 0,
    exit_count: int | None = None,
) -> ExitStep:
    """One early-exit decision over the M active samples (see the module docstring).

    Args:
        logits: [M, C] float32 / bfloat16 / float16, any strides: this exit's logits of the
            active samples.
        active_index: [M] int64, their (distinct) positions in the output buffers.
        hidden: None, or a tensor [M, ...] whose surviving rows are gathered.
        prediction, exit_index: [N] int64 output buffers (contiguous), written in place.
        confidence: [N] float32 output buffer, written in place.
        threshold: rows with confidence >= threshold exit (-inf: all; +inf: none). Not NaN.
        criterion: ``max_prob``, ``entropy`` or ``margin``.
        exit_id: the value written into ``exit_index`` for the exiting rows.
        exit_count: quota mode when not None: this many most confident rows exit.

    Returns:
        :class:`ExitStep` (survivor_index [R], keep_local [R], hidden [R, ...]).
    """
    threshold, count = _validate_step(
        logits, active_index, hidden, prediction, exit_index, confidence, threshold, exit_count
    )
    code = criterion_code(criterion)
    args = (
        logits,
        active_index,
        hidden,
        prediction,
        exit_index,
        confidence,
        threshold,
        code,
        int(exit_id),
        count,
    )
    if has_kernel(logits.device.type):
        return ExitStep(*torch.ops.ann_kernels.early_exit_step(*args))
    _warn_no_kernel(logits.device.type)
    return early_exit_step_reference(*args)


def _warn_no_kernel(device_type: str) -> None:
    reason = "the C++ extension is not built" if not HAS_CPP_EXT else f"no kernel for device {device_type!r}"
    warn_fallback("early_exit_step", reason)


def step_function(device_type: str):
    """The fastest callable with the op's positional signature for ``device_type``: the
    direct binding ``ann_kernels._C.early_exit_step`` when a kernel exists, else the
    reference (after a one-time warning). Returns raw (survivor_index, keep_local, hidden)
    tuples and does no argument checking: for callers that build the arguments themselves."""
    if has_kernel(device_type):
        from ann_kernels import _C

        return _C.early_exit_step
    _warn_no_kernel(device_type)
    return early_exit_step_reference


def output_buffers(like: torch.Tensor, n: int):
    """(prediction [n] int64, exit_index [n] int64, confidence [n] float32, arange(n) int64)
    on ``like``'s device: the per-call state of a stage loop (pure-torch version)."""
    options = {"dtype": torch.int64, "device": like.device}
    return (
        torch.empty(n, **options),
        torch.empty(n, **options),
        torch.empty(n, dtype=torch.float32, device=like.device),
        torch.arange(n, **options),
    )


def buffers_function(device_type: str):
    """``output_buffers`` in one C++ call (``ann_kernels._C.early_exit_buffers``) when the
    extension has a kernel for ``device_type``, else the pure-torch version."""
    if has_kernel(device_type):
        from ann_kernels import _C

        return _C.early_exit_buffers
    return output_buffers


def exit_confidence(logits: torch.Tensor, criterion: str = "max_prob"):
    """Confidence [M] float32 and prediction [M] int64 of every row of ``logits`` [M, C],
    computed by the op's kernel (threshold -inf), so calibrated thresholds compare the
    very numbers :class:`~ann_kernels.EarlyExitEngine` will see."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits: expected a [M, C] tensor, got {getattr(logits, 'shape', type(logits))}")
    num_rows, device = logits.shape[0], logits.device
    prediction = torch.empty(num_rows, dtype=torch.int64, device=device)
    exit_index = torch.empty(num_rows, dtype=torch.int64, device=device)
    confidence = torch.empty(num_rows, dtype=torch.float32, device=device)
    active = torch.arange(num_rows, device=device)
    early_exit_step(
        logits, active, None, prediction, exit_index, confidence, threshold=-math.inf, criterion=criterion
    )
    return confidence, prediction


# ---------------------------------------------------------------------------------------
# torch.library registrations (schema in csrc/ops.cpp).

if HAS_CPP_EXT:

    @_compat.register_fake(_OP_NAME)
    def _early_exit_step_fake(
        logits,
        active_index,
        hidden,
        prediction,
        exit_index,
        confidence,
        threshold,
        criterion,
        exit_id,
        exit_count,
    ):
        survivors = _compat.new_dynamic_size()
        index = active_index.new_empty(survivors)
        gathered = gathered_hidden_empty(hidden, survivors) if hidden is not None else logits.new_empty(0)
        return index, active_index.new_empty(survivors), gathered
