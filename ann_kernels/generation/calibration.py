"""Confidence thresholds of ``mode="confidence"`` for a target mean cost per token,
calibrated on held-out text with the MSDNet calibration we already have
(:func:`ann_kernels.inference.calibrate_for_budget`; ``shared/DESIGN.md``, "Early-exit
inference").

Held-out token blocks [N, S] run teacher-forced through the model (every exit's logits at
every position, without a cache: :func:`forward_exits`); a position's confidence at exit k
is the fused op's own number (:func:`ann_kernels.ops.early_exit.exit_confidence`), and it is
"correct" at exit k when exit k's argmax equals the last exit's (CALM's consistency target:
the quality goal is to stay with the full model's output). The cost of exit k per token is
its depth: (layers up to exit k) x FLOPs per layer + (k + 1) head evaluations, which is what
``kv_policy="propagate"`` pays (plus the skipped layers' K/V projections) and what bounds a
token's latency under ``recompute`` (whose skipped layers still run later, batched with the
row's next deep token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ann_kernels.generation.adapters import DecoderAdapter, as_adapter
from ann_kernels.inference.calibration import BudgetCalibration, calibrate_for_budget
from ann_kernels.ops.early_exit import exit_confidence

__all__ = ["calibrate_generation", "exit_costs", "forward_exits"]


@torch.inference_mode()
def forward_exits(adapter: DecoderAdapter, tokens: Tensor) -> list[Tensor]:
    """Every exit's logits [B, S, V] for token blocks [B, S] (positions 0..S-1), causal
    attention over the whole block, no cache."""
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    h = adapter.embed(tokens, positions)
    rope = adapter.rope(positions, h)
    gqa = adapter.num_heads != adapter.num_kv_heads
    out, exit_id = [], 0
    for i in range(adapter.num_layers):
        q, k, v = adapter.qkv(i, h, rope)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=getattr(adapter, "scaling", None),
                                           enable_gqa=gqa)
        h = adapter.finish_layer(i, h, a.transpose(1, 2).reshape(b, s, -1))
        if i == adapter.exit_layers[exit_id]:
            out.append(adapter.exit_logits(h, exit_id))
            exit_id += 1
    return out


def exit_costs(adapter: DecoderAdapter, exits=None) -> Tensor:
    """float64 [K'] for the exits ``exits`` (default: all K): FLOPs per token to reach and
    evaluate each (2 x multiply-adds of the layers' and heads' weights, the heads of the
    earlier exits in ``exits`` included; attention scores left out)."""
    if hasattr(adapter, "blocks"):
        layer = sum(p.numel() for p in adapter.blocks[0].parameters() if p.dim() > 1)
    else:
        layer = sum(p.numel() for p in adapter.layers[0].parameters() if p.dim() > 1)
    head = adapter.hidden_size * adapter.vocab_size
    exits = range(adapter.num_exits) if exits is None else exits
    return torch.tensor([2.0 * ((adapter.exit_layers[k] + 1) * layer + (j + 1) * head) for j, k in enumerate(exits)],
                        dtype=torch.float64)


@torch.inference_mode()
def calibrate_generation(model, held_out: Tensor, budget: float, *, criterion: str = "max_prob",
                         exit_layers=None, exits=None, batch_size: int = 16) -> BudgetCalibration:
    """Thresholds for ``generate(mode="confidence", threshold=result)`` whose held-out mean
    cost per token is at most ``budget`` (a fraction <= 1 of the full model's cost, or FLOPs
    per token when > 1), maximising agreement with the last exit.

    Args:
        model: as for :func:`ann_kernels.generate`. held_out: [N, S] token ids (int64).
        exits: the exits (0-based) a token may leave at (default: all; the last is always
            added). The others get threshold +inf, so their heads are never evaluated and
            cost nothing (a head over a large vocabulary can cost more than a layer).
    Returns:
        :class:`ann_kernels.inference.BudgetCalibration` (``thresholds`` [K], ``mean_flops``,
        ``accuracy`` = held-out agreement with the full model, ``exit_counts``).
    """
    adapter = as_adapter(model, exit_layers)
    if not isinstance(held_out, Tensor) or held_out.dim() != 2 or held_out.dtype.is_floating_point:
        raise ValueError(f"held_out: expected a [N, S] tensor of token ids, got {getattr(held_out, 'shape', held_out)}")
    if held_out.numel() == 0:
        raise ValueError("held_out: no tokens")
    k_exits = adapter.num_exits
    allowed = sorted({int(k) for k in (exits if exits is not None else range(k_exits))} | {k_exits - 1})
    if allowed[0] < 0 or allowed[-1] >= k_exits:
        raise ValueError(f"exits: expected exit indices in [0, {k_exits}), got {list(exits)}")
    costs = exit_costs(adapter, allowed)
    full = float(exit_costs(adapter, [k_exits - 1])[0])
    if not budget > 0:
        raise ValueError(f"budget: expected a positive fraction (<= 1) or FLOPs per token, got {budget!r}")
    flops_budget = budget * full if budget <= 1 else float(budget)
    confidences, agree = [], []
    for start in range(0, held_out.shape[0], batch_size):
        logits = forward_exits(adapter, held_out[start:start + batch_size].to(adapter.device))
        flat = [z.reshape(-1, z.shape[-1]).float() for z in logits]
        final = flat[-1].argmax(dim=-1)
        conf = [exit_confidence(z, criterion)[0] for z in flat]
        confidences.append(torch.stack(conf).cpu())
        agree.append(torch.stack([z.argmax(dim=-1) == final for z in flat]).cpu())
    index = torch.tensor(allowed)
    result = calibrate_for_budget(torch.cat(confidences, 1)[index], torch.cat(agree, 1)[index], costs, flops_budget)
    if len(allowed) == k_exits:
        return result
    thresholds = torch.full((k_exits,), float("inf"), dtype=result.thresholds.dtype)
    thresholds[index] = result.thresholds
    fractions = torch.zeros(k_exits, dtype=result.exit_fractions.dtype)
    fractions[index] = result.exit_fractions
    counts = torch.zeros(k_exits, dtype=result.exit_counts.dtype)
    counts[index] = result.exit_counts
    return BudgetCalibration(thresholds=thresholds, exit_fractions=fractions, mean_flops=result.mean_flops,
                             accuracy=result.accuracy, exit_counts=counts, budget=result.budget)
