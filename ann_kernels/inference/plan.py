"""Exit plans and cost tables: how an :class:`~ann_kernels.EarlyExitEngine` call, a stream or
the server decides at each exit (thresholds, or per-batch exit counts for ``quota``), and the
per-exit FLOPs they report."""

from __future__ import annotations

import math
from typing import NamedTuple

from ann_kernels.inference.arguments import as_float_list

__all__ = ["ExitCosts", "ExitPlan", "executed_costs", "plan_exits"]

FLOOR_EPS = 1e-9  # floor(N * cumulative quota) tolerates this much rounding below an integer


class ExitPlan(NamedTuple):
    """``thresholds`` K floats (the last is -inf: everyone left exits); ``exit_counts`` K ints
    (-1 everywhere = threshold mode; else how many rows exit k takes in this batch)."""

    thresholds: tuple[float, ...]
    exit_counts: tuple[int, ...]


class ExitCosts(NamedTuple):
    """Per-sample FLOPs [K] each: of each exit (stages 0..k + head k), each stage, each head."""

    exit_flops: tuple[float, ...]
    stage_flops: tuple[float, ...]
    head_flops: tuple[float, ...]


def plan_exits(num_exits: int, n: int, thresholds=None, quota=None) -> ExitPlan:
    """The plan of a batch of ``n`` rows: ``thresholds`` [K] (the last ignored), or ``quota``
    [K] fractions (sum <= 1; exit k takes floor(n * (q_0 + ... + q_k)) minus the rows already
    gone), or neither (full depth). At most one of them (callers resolve budgets to thresholds)."""
    no_counts = (-1,) * num_exits
    if thresholds is not None and quota is not None:
        raise ValueError("thresholds and quota: give at most one of thresholds, budget and quota")
    if thresholds is not None:
        values = as_float_list(thresholds, "thresholds")
        if len(values) != num_exits:
            raise ValueError(f"thresholds: expected {num_exits} values (one per exit), got {len(values)}")
        if any(map(math.isnan, values)):
            raise ValueError(f"thresholds: must not contain NaN, got {values}")
        return ExitPlan(tuple(values[:-1]) + (-math.inf,), no_counts)
    if quota is not None:
        fractions = check_quota(num_exits, quota)
        counts, cumulative, previous = [], 0.0, 0
        for f in fractions[:-1]:
            cumulative += f
            target = min(n, math.floor(n * cumulative + FLOOR_EPS))
            counts.append(max(0, target - previous))
            previous = max(previous, target)
        return ExitPlan((math.inf,) * (num_exits - 1) + (-math.inf,), tuple(counts) + (-1,))
    return ExitPlan((math.inf,) * (num_exits - 1) + (-math.inf,), no_counts)


def check_quota(num_exits: int, quota) -> list[float]:
    """``quota`` as K floats, each finite and >= 0, summing to at most 1 (else ValueError)."""
    fractions = as_float_list(quota, "quota")
    if len(fractions) != num_exits:
        raise ValueError(f"quota: expected {num_exits} fractions (one per exit), got {len(fractions)}")
    if any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"quota: expected finite fractions >= 0, got {fractions}")
    if sum(fractions) > 1 + 1e-6:
        raise ValueError(f"quota: fractions must sum to at most 1, got {sum(fractions):.6g} ({fractions})")
    return fractions


def executed_costs(costs: ExitCosts, thresholds) -> list[float]:
    """Per exit e: FLOPs run for a row leaving there (stages 0..e, plus every head evaluated
    on the way: heads of +inf exits are skipped)."""
    out, total = [], 0.0
    for k, (stage, head) in enumerate(zip(costs.stage_flops, costs.head_flops)):
        total += stage
        out.append(total + head)
        if thresholds[k] != math.inf:
            total += head
    return out
