"""What happens to rows that finish while others decode on: compaction or masking.

- **compact**: the last live rows move into the finished rows' slots (``KVCache.move_rows``:
  one slot copied per moving row, in every layer's K and V), and later steps run on fewer
  rows;
- **mask**: the finished rows stay in their slots and keep riding along in the batched passes
  (their tokens are ignored; they rewrite only their own cache at their own last position and
  never advance), so nothing is copied, but every later step pays for them.

The choice is made per step from a cost model measured once per model and cache shape
(:func:`measure_row_costs`, cached while the model lives): the marginal seconds one row adds
to one layer pass and to one exit head, and the seconds of copying k slots. With the running
work per row-step of the mode (layer and head evaluations per row per step, from the decode
state's counters) and the steps the longest live row still needs, masking costs

    dead rows x remaining steps x (layers per row-step x row_layer_s + heads x row_head_s)

and compaction costs ``copy_fixed_s + copy_row_s x movers`` (movers: live rows sitting past the
new end; 0 when the finished rows are the last slots, which makes compaction free).
:func:`prefer_masking` compares the two.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from dataclasses import dataclass

import torch

__all__ = ["FINISHED_ROW_POLICIES", "RowCosts", "measure_row_costs", "prefer_masking", "masking_cost",
           "compaction_cost"]

FINISHED_ROW_POLICIES = ("auto", "compact", "mask")

# model (or adapter) -> {(slots, positions, dtype, device): RowCosts}; entries die with the model
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RowCosts:
    """Measured seconds: ``row_layer_s`` one more row through one layer at one position;
    ``row_head_s`` one more row through one exit head; ``copy_fixed_s`` + ``copy_row_s`` x k
    copying k cache slots (every layer, K and V, the token and hidden buffers)."""

    row_layer_s: float
    row_head_s: float
    copy_fixed_s: float
    copy_row_s: float


def masking_cost(costs: RowCosts, dead_rows: int, remaining_steps: float, layers_per_row_step: float,
                 heads_per_row_step: float) -> float:
    """Seconds the dead rows add to the remaining steps if they stay in the batch."""
    per_row_step = layers_per_row_step * costs.row_layer_s + heads_per_row_step * costs.row_head_s
    return dead_rows * remaining_steps * per_row_step


def compaction_cost(costs: RowCosts, movers: int) -> float:
    """Seconds of compacting now: nothing when no live row has to move."""
    return 0.0 if movers == 0 else costs.copy_fixed_s + costs.copy_row_s * movers


def prefer_masking(costs: RowCosts, dead_rows: int, movers: int, remaining_steps: float,
                   layers_per_row_step: float, heads_per_row_step: float) -> bool:
    """True when keeping ``dead_rows`` masked for ``remaining_steps`` steps is cheaper than
    moving ``movers`` live rows into their slots now."""
    if dead_rows == 0:
        return False
    return (masking_cost(costs, dead_rows, remaining_steps, layers_per_row_step, heads_per_row_step)
            < compaction_cost(costs, movers))


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure_row_costs(state, reps: int = 5) -> RowCosts:
    """The :class:`RowCosts` of ``state``'s model on its cache shape: measured once (layer
    passes at 1 and ``slots`` rows writing only the cache's scratch column, exit heads at both
    sizes, slot copies of 1 and ``slots`` slots onto themselves, so no row changes), then
    cached per model, slots, positions, dtype and device while the model lives."""
    ad = state.adapter
    owner = getattr(ad, "model", ad)
    key = (state.slots, state.T, ad.dtype, str(state.device))
    table = _MEASURED.setdefault(owner, {})
    if key in table:
        return table[key]
    # 1. a layer pass at one position per row: query position 0, K/V into the scratch column
    hi = max(state.slots, 2)
    sizes = (1, hi) if state.slots >= 2 else (1, 1)
    layers = list(range(ad.num_layers))
    t_layer, t_head = {}, {}
    for m in sizes:
        h = torch.zeros(m, 1, ad.hidden_size, dtype=ad.dtype, device=state.device)
        qpos = torch.zeros(m, 1, dtype=torch.int64)
        write = torch.full((m, 1), state.T, dtype=torch.int64)

        def layer_pass(h=h, qpos=qpos, write=write):
            state.run_layers(layers, h, qpos, write)
            state.wait()

        def head_pass(h=h):
            ad.exit_logits(h[:, 0], ad.num_exits - 1)
            state.wait()

        layer_pass()
        t_layer[m] = _median_time(layer_pass, reps) / len(layers)
        t_head[m] = _median_time(head_pass, reps)
    span = max(sizes[1] - sizes[0], 1)
    row_layer = max(t_layer[sizes[1]] - t_layer[sizes[0]], 0.0) / span
    row_head = max(t_head[sizes[1]] - t_head[sizes[0]], 0.0) / span
    # 2. slot copies (each slot onto itself: the data stays as it is)
    t_copy = {}
    for m in (1, state.slots):
        idx = torch.arange(m, device=state.device)
        t_copy[m] = _median_time(lambda idx=idx: (state.copy_slots(idx, idx), state.wait()), reps)
    per_slot = max(t_copy[state.slots] - t_copy[1], 0.0) / max(state.slots - 1, 1)
    costs = RowCosts(row_layer, row_head, max(t_copy[1] - per_slot, 0.0), per_slot)
    if not all(math.isfinite(v) for v in (row_layer, row_head, per_slot)):
        raise RuntimeError(f"measure_row_costs: non-finite timings {costs}")
    table[key] = costs
    return costs
