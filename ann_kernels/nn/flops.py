"""FLOP counting for exit-cost accounting.

``count_flops`` wraps :class:`torch.utils.flop_counter.FlopCounterMode`. That counter only
counts matrix products: convolutions, ``mm``/``addmm``/``bmm`` (so ``nn.Linear``) and
scaled-dot-product attention, each as 2 * multiply-accumulates. Biases, normalisation,
activations, pooling, softmax and elementwise ops count 0. On CPU, PyTorch runs
``F.scaled_dot_product_attention`` through ``aten._scaled_dot_product_flash_attention_for_cpu``,
which the stock counter does not know (it would count 0); we add the same formula torch
uses for its GPU attention kernels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_flops"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of softmax(q k^T) v for q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv]."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def count_flops(fn: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """Run ``fn(*args)`` under a FLOP counter; return ``(total_flops, fn's result)``.

    The total covers the whole call (all samples of the batch), counting matmul, conv and
    attention FLOPs only (2 * MACs); see the module docstring.
    """
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        result = fn(*args)
    return counter.get_total_flops(), result
