"""Row bookkeeping of hidden states, shared by the engine, the stream, the server and the
EANN engine.

A *hidden state* is what a stage of a :class:`~ann_kernels.nn.MultiExitNetwork` passes to
the next: one tensor [N, ...] or a tuple / list of tensors that all have the N rows first
(multi-scale networks). Every function here keeps the container type (tuple stays tuple,
list stays list) and the memory layout the fused exit op produces for its gathered rows
(channels_last stays channels_last: :func:`~ann_kernels.ops.early_exit.gathered_hidden_empty`).
"""

from __future__ import annotations

from array import array

import torch

from ann_kernels.ops.early_exit import gathered_hidden_empty

__all__ = ["concat_rows", "gather_rest", "gather_rows", "gather_tensor_rows", "int64_tensor", "split_rows"]


def gather_tensor_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` [m] int64 of ``t`` [N, ...] -> [m, ...], laid out as the exit op lays out
    its gathered hidden state."""
    if t.dim() < 3 or t.is_contiguous():
        return t.index_select(0, rows)
    return torch.index_select(t, 0, rows, out=gathered_hidden_empty(t, rows.shape[0]))


def gather_rows(hidden, rows: torch.Tensor):
    """Rows ``rows`` [m] int64 of a hidden state (a tensor, or a tuple / list of tensors)."""
    if isinstance(hidden, torch.Tensor):
        return gather_tensor_rows(hidden, rows)
    gathered = [gather_tensor_rows(t, rows) for t in hidden]
    return gathered if isinstance(hidden, list) else tuple(gathered)


def gather_rest(hidden, first: torch.Tensor, rows: torch.Tensor):
    """A tuple / list hidden state whose first tensor the exit op already gathered (``first``,
    rows ``rows`` of ``hidden[0]``): gather the same rows of the others."""
    rest = [gather_tensor_rows(t, rows) for t in hidden[1:]]
    return [first, *rest] if isinstance(hidden, list) else (first, *rest)


def concat_rows(pieces):
    """Concatenate hidden states (all tensors, or all tuples / lists of the same length) along
    the rows; a single piece is returned as is (no copy)."""
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces)
    parts = [torch.cat([p[i] for p in pieces]) for i in range(len(pieces[0]))]
    return parts if isinstance(pieces[0], list) else tuple(parts)


def split_rows(hidden, rows: int):
    """(first ``rows`` rows, the rest) of a hidden state, as views."""
    if isinstance(hidden, torch.Tensor):
        return hidden[:rows], hidden[rows:]
    head, tail = [t[:rows] for t in hidden], [t[rows:] for t in hidden]
    return (head, tail) if isinstance(hidden, list) else (tuple(head), tuple(tail))


def int64_tensor(values) -> torch.Tensor:
    """A CPU int64 tensor [n] of the Python ints ``values`` (n >= 1), through an ``array``:
    ~3x faster than ``torch.tensor(list)`` for the few hundred bookkeeping ints of a stage
    run (``torch.tensor`` converts element by element)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64)
