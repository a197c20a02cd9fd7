"""The preallocated KV cache and cached attention of the decoding engine.

One key and one value tensor per layer, each [slots, Hkv, T + 1, d] in the model's dtype:
``slots`` rows (the most a batch holds), positions 0 .. T - 1, and one scratch column T that
padding queries write into (never read: a query at position p attends to positions <= p < T).
A row's tokens sit at their absolute positions 0, 1, 2, ... (no left padding), so the
attention mask is causal on absolute positions and nothing of another row or of padding can
leak in. The active rows of a batch are always the slots 0 .. n - 1 (the decode state
compacts rows that leave with :meth:`KVCache.move_rows`), so reading them is a view.

Which positions of a layer hold valid entries is the decode state's business
(``DecodeState.seg_len``: per row, per segment of layers between two exits); a query at
position p must only run once positions 0 .. p - 1 are valid in its layer, which every mode
guarantees (see ``ann_kernels.generation.state``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVCache", "additive_mask", "cached_attention"]


def additive_mask(visible: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The additive attention mask of a bool mask ``visible`` (True = attend): 0 where
    visible, -inf elsewhere, in ``dtype``. ``scaled_dot_product_attention`` turns a bool mask
    into this on every call; building it once per step saves that conversion in every layer."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


class KVCache:
    """Preallocated per-layer K/V storage (see the module docstring).

    Args:
        num_layers, slots, num_kv_heads, head_dim: sizes.
        max_positions: T, the positions a row may use (prompt + new tokens + draft slack).
        dtype, device: of the model.
    """

    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, head_dim: int, max_positions: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, num_kv_heads, max_positions + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_positions, self.num_kv_heads = slots, max_positions, num_kv_heads
        self.scratch = max_positions
        self._heads = torch.arange(num_kv_heads, device=device).view(1, -1, 1)

    def write_index(self, write_pos: Tensor, rows=None, same_position: int | None = None):
        """The ``index_put_`` index of positions ``write_pos`` [n, s] (device int64) of slots
        ``rows`` (None: 0..n-1; an int r: r..r+n-1; a device tensor [n] of slots); a plain
        slice when ``same_position`` says every row writes positions same_position ..
        same_position + s - 1."""
        n, s = write_pos.shape
        if same_position is not None and (rows is None or isinstance(rows, int)):
            first = 0 if rows is None else rows
            return (slice(first, first + n), slice(None), slice(same_position, same_position + s))
        if rows is None or isinstance(rows, int):
            first = 0 if rows is None else rows
            slots = torch.arange(first, first + n, device=write_pos.device)
        else:
            slots = rows
        return slots.view(n, 1, 1), self._heads, write_pos.unsqueeze(1)

    def write(self, layer: int, write_pos: Tensor, k: Tensor, v: Tensor, rows=None, index=None) -> None:
        """Store k, v [n, Hkv, s, d] at positions ``write_pos`` [n, s] of slots ``rows`` (see
        :meth:`write_index`; ``index``: that index, precomputed)."""
        if index is None:
            index = self.write_index(write_pos, rows)
        if isinstance(index[0], slice):  # rows 0..n-1 (or from an offset) all at one run of positions: a slice copy
            self.keys[layer][index].copy_(k)
            self.values[layer][index].copy_(v)
            return
        self.keys[layer].index_put_(index, k)
        self.values[layer].index_put_(index, v)

    def move_rows(self, src: Tensor, dst: Tensor) -> None:
        """Copy slots ``src`` [m] into slots ``dst`` [m] in every layer (compaction)."""
        for t in self.keys + self.values:
            t.index_copy_(0, dst, t.index_select(0, src))


def cached_attention(cache: KVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, write_pos: Tensor,
                     mask: Tensor | None, window: int, gqa: bool, scale: float | None, rows=None,
                     index=None) -> Tensor:
    """Write k, v into the cache, then attend q [n, Hq, s, d] over positions 0..window-1 of
    slots ``rows`` (as in :meth:`KVCache.write`; a prefix or an int offset is a view, a tensor
    of slots a gather) with ``mask`` [n, 1, s, window] (bool, True = attend, or additive float: :func:`additive_mask`;
    None = all).
    Returns [n, s, Hq * d]."""
    cache.write(layer, write_pos, k, v, rows, index)
    n = q.shape[0]
    if rows is None or isinstance(rows, int):
        first = 0 if rows is None else rows
        keys = cache.keys[layer][first:first + n, :, :window]
        values = cache.values[layer][first:first + n, :, :window]
    else:
        keys = cache.keys[layer][:, :, :window].index_select(0, rows)
        values = cache.values[layer][:, :, :window].index_select(0, rows)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(n, q.shape[2], -1)
