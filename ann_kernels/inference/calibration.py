"""Confidence thresholds for budgeted early exit, calibrated on held-out data (MSDNet,
Huang et al., ICLR 2018; ``shared/DESIGN.md``, "Early-exit inference").

Inputs are per-exit confidences ``confidence`` [K, N] (float32, higher = more confident; use
:func:`ann_kernels.ops.early_exit.exit_confidence` so the numbers are the kernel's own),
whether each exit's prediction is right ``correct`` [K, N] (bool), and the per-sample cost of
each exit ``exit_flops`` [K] (``MultiExitNetwork.exit_flops``). A sample leaves at the first
exit k with ``confidence[k] >= thresholds[k]``; the last threshold is -inf.

- :func:`calibrate_thresholds`: MSDNet's walk for given exit fractions p [K]: for k < K-1,
  among the samples that have not exited yet, sorted by confidence[k] descending, the
  floor(N p_k)-th one sets the threshold (+inf when that count is 0 or fewer samples
  remain); every sample with confidence[k] >= threshold then exits.

  **Deviation from MSDNet** (kalviny/MSDNet-PyTorch, ``adaptive_inference.py``,
  ``Tester.dynamic_eval_find_threshold``, which sets ``T[k]`` to exactly that sample's
  confidence): the threshold is placed in the gap *below* it, at the midpoint between that
  confidence c_n and the largest confidence at exit k strictly below c_n (of any calibration
  sample, so every calibration sample is at least half that gap away); with nothing below,
  at c_n - 2^-16 max(1, |c_n|). The calibration split's own exits are exactly MSDNet's (the
  same samples are >= the threshold), but no calibration sample sits *on* a threshold,
  where the few-ulp rounding differences between batch sizes (a GEMM at another batch size,
  the server's batching) would flip its exit between a batched and an unbatched run. Where
  c_n and the next lower confidence are adjacent floats (no float in between), MSDNet's c_n
  is kept.
- :func:`calibrate_for_budget`: the thresholds with the best held-out accuracy among those
  whose held-out mean cost is within the budget, over MSDNet's geometric family
  p_k proportional to r^k (MSDNet's r = 1/20 ... 39/20 plus a log grid 1e-3 ... 1e3) and the
  K one-exit-only allocations (which make every budget from the cheapest exit up feasible),
  each also on every prefix of the exits: the family over exits 1..m, exit m taking every
  sample left (threshold -inf, later exits never run). A superset of MSDNet's search, so the
  held-out accuracy at a budget can only rise; it matters when there are many exits (an
  EANN's sequence) and a low budget is best spent on the first few alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BudgetCalibration",
    "calibrate_for_budget",
    "calibrate_thresholds",
    "candidate_exit_fractions",
    "geometric_exit_fractions",
    "simulate_thresholds",
]

# floor(N p) guard against binary rounding (100 * 0.29 = 28.999999999999996).
_FLOOR_EPS = 1e-9
# Bound on the [P, K, N] decision tensor of one simulation chunk.
_MAX_SIMULATION_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BudgetCalibration:
    """The result of :func:`calibrate_for_budget` (all numbers on the held-out split).

    - ``thresholds``: [K] in the confidences' dtype, the last one -inf.
    - ``exit_fractions``: [K] float64, the fraction vector p the thresholds came from.
    - ``mean_flops``: held-out mean cost per sample (<= ``budget``).
    - ``accuracy``: held-out accuracy with these thresholds.
    - ``exit_counts``: [K] int64, held-out samples leaving at each exit.
    """

    thresholds: torch.Tensor
    exit_fractions: torch.Tensor
    mean_flops: float
    accuracy: float
    exit_counts: torch.Tensor
    budget: float


def _check_confidence(confidence) -> torch.Tensor:
    if not isinstance(confidence, torch.Tensor) or confidence.dim() != 2:
        got = tuple(confidence.shape) if isinstance(confidence, torch.Tensor) else type(confidence)
        raise ValueError(f"confidence: expected a [K, N] tensor (exits x held-out samples), got {got}")
    if not confidence.dtype.is_floating_point:
        raise TypeError(f"confidence: expected a floating tensor, got {confidence.dtype}")
    if confidence.shape[0] == 0 or confidence.shape[1] == 0:
        raise ValueError(
            f"confidence: needs at least one exit and one sample, got shape {tuple(confidence.shape)}"
        )
    return confidence.detach().cpu()


def _check_fractions(exit_fractions, num_exits: int) -> torch.Tensor:
    fractions = torch.as_tensor(exit_fractions, dtype=torch.float64).detach().cpu()
    if fractions.dim() == 1:
        fractions = fractions.unsqueeze(0)
    if fractions.dim() != 2 or fractions.shape[1] != num_exits:
        raise ValueError(
            f"exit_fractions: expected {num_exits} values (one per exit), got shape "
            f"{tuple(torch.as_tensor(exit_fractions).shape)}"
        )
    if not torch.isfinite(fractions).all() or (fractions < 0).any():
        raise ValueError(f"exit_fractions: expected finite non-negative fractions, got {fractions.tolist()}")
    if (fractions.sum(dim=1) > 1 + 1e-6).any():
        raise ValueError(f"exit_fractions: must sum to at most 1, got sums {fractions.sum(dim=1).tolist()}")
    return fractions


def _rank_key(confidence: torch.Tensor) -> torch.Tensor:
    """NaN confidences rank lowest (the kernel's rule)."""
    return torch.nan_to_num(confidence, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _thresholds_for_fractions(confidence: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """MSDNet's walk for P fraction vectors at once: [K, N] x [P, K] -> thresholds [P, K]."""
    num_exits, n = confidence.shape
    num_candidates = fractions.shape[0]
    key = _rank_key(confidence)
    sorted_conf, order = key.sort(dim=1, descending=True, stable=True)
    ascending = sorted_conf.flip(1).contiguous()
    counts = torch.floor(n * fractions + _FLOOR_EPS).to(torch.int64)  # [P, K]
    thresholds = torch.full((num_candidates, num_exits), math.inf, dtype=confidence.dtype)
    thresholds[:, -1] = -math.inf
    exited = torch.zeros(num_candidates, n, dtype=torch.bool)
    finite_key = ~confidence.isnan()  # a NaN confidence never passes a threshold: never counted
    for k in range(num_exits - 1):
        # [P, N], by confidence[k] desc: rows still running that could exit here.
        remaining_sorted = (~exited[:, order[k]] & finite_key[k, order[k]]).to(torch.int64)
        seen = remaining_sorted.cumsum(dim=1)
        wanted = counts[:, k]
        position = (seen >= wanted.unsqueeze(1)).to(torch.int8).argmax(dim=1)  # first reaching the count
        valid = (wanted > 0) & (seen[:, -1] >= wanted)
        gap_threshold = _threshold_below(sorted_conf[k, position], ascending[k])
        thresholds[:, k] = torch.where(valid, gap_threshold, torch.full_like(gap_threshold, math.inf))
        exited |= key[k].unsqueeze(0) >= thresholds[:, k].unsqueeze(1)
    return thresholds


def _threshold_below(chosen: torch.Tensor, ascending: torch.Tensor) -> torch.Tensor:
    """Thresholds in the gap below each ``chosen`` confidence c_n [P]: the midpoint between
    c_n and the largest confidence of ``ascending`` [N] (exit k's rank keys, sorted, NaN as
    -inf) strictly below it; c_n - 2^-16 max(1, |c_n|) when none is below; c_n itself where
    no float of the dtype lies strictly between the two (see the module docstring)."""
    below_index = torch.searchsorted(ascending, chosen, right=False) - 1  # last element < c_n
    below = ascending[below_index.clamp(min=0)].to(torch.float64)
    has_below = (below_index >= 0) & torch.isfinite(below)
    c_n = chosen.to(torch.float64)
    margin = torch.clamp(c_n.abs(), min=1.0) * 2.0**-16
    candidate = torch.where(has_below, (c_n + below) / 2, c_n - margin).to(chosen.dtype)
    # Keep c_n where rounding to the dtype left no room (adjacent floats) or c_n is not finite.
    inside = (candidate.to(torch.float64) < c_n) & (~has_below | (candidate.to(torch.float64) > below))
    return torch.where(inside & torch.isfinite(c_n), candidate, chosen)


def calibrate_thresholds(confidence: torch.Tensor, exit_fractions) -> torch.Tensor:
    """MSDNet's thresholds for target exit fractions (see the module docstring).

    Args:
        confidence: [K, N] float, held-out confidences of every exit (higher = more confident).
        exit_fractions: [K] non-negative fractions p_k with sum <= 1: about floor(N p_k)
            held-out samples leave at exit k (ties at the threshold all leave; the last exit
            takes everyone left, whatever p_{K-1} says).

    Returns:
        thresholds [K] in confidence's dtype: +inf where nobody exits, -inf at the last exit.
    """
    confidence = _check_confidence(confidence)
    fractions = _check_fractions(exit_fractions, confidence.shape[0])
    if fractions.shape[0] != 1:
        raise ValueError(
            f"exit_fractions: expected one vector of {confidence.shape[0]} fractions, "
            f"got {fractions.shape[0]}"
        )
    return _thresholds_for_fractions(confidence, fractions)[0]


def geometric_exit_fractions(num_exits: int, ratio: float) -> torch.Tensor:
    """MSDNet's family p_k proportional to ratio^k (k = 1..K), normalised to sum 1: [K] float64."""
    if not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits: expected a positive int, got {num_exits!r}")
    if not ratio > 0 or not math.isfinite(ratio):
        raise ValueError(f"ratio: expected a finite positive number, got {ratio!r}")
    log_weights = math.log(ratio) * torch.arange(1, num_exits + 1, dtype=torch.float64)
    return torch.softmax(log_weights, dim=0)  # = ratio^k / sum_j ratio^j, without overflow


def candidate_exit_fractions(num_exits: int) -> torch.Tensor:
    """The fraction vectors :func:`calibrate_for_budget` searches: [P, K] float64."""
    ratios = [i / 20 for i in range(1, 40)] + torch.logspace(-3, 3, 121, dtype=torch.float64).tolist()
    family = torch.stack([geometric_exit_fractions(num_exits, r) for r in ratios])
    one_exit = torch.eye(num_exits, dtype=torch.float64)
    return torch.cat([family, one_exit])


def simulate_thresholds(
    confidence: torch.Tensor, correct: torch.Tensor, exit_flops, thresholds: torch.Tensor
):
    """Held-out outcome of thresholds [P, K] (or [K]): (accuracy [P], mean_flops [P],
    exit_counts [P, K]), all float64 / int64, P = 1 dropped for a [K] input."""
    confidence = _check_confidence(confidence)
    num_exits, n = confidence.shape
    correct_t = torch.as_tensor(correct).detach().cpu()
    if correct_t.shape != confidence.shape:
        raise ValueError(
            f"correct: expected shape {tuple(confidence.shape)} like confidence, got {tuple(correct_t.shape)}"
        )
    correct_t = correct_t.to(torch.float64)
    flops = _check_flops(exit_flops, num_exits)
    single = thresholds.dim() == 1
    thresholds = thresholds.reshape(-1, num_exits).to(confidence.dtype)
    key = _rank_key(confidence)
    chunk = max(1, _MAX_SIMULATION_ELEMENTS // (num_exits * n))
    accuracy, cost, counts = [], [], []
    for start in range(0, thresholds.shape[0], chunk):
        block = thresholds[start : start + chunk]
        passes = key.unsqueeze(0) >= block.unsqueeze(2)  # [p, K, N]
        passes[:, -1] = True
        exit_at = passes.to(torch.int8).argmax(dim=1)  # the first exit that accepts
        accuracy.append(correct_t.gather(0, exit_at).mean(dim=1) if n else torch.zeros(len(block)))
        cost.append(flops[exit_at].mean(dim=1))
        counts.append(torch.nn.functional.one_hot(exit_at, num_exits).sum(dim=1))
    accuracy, cost, counts = torch.cat(accuracy), torch.cat(cost), torch.cat(counts)
    return (accuracy[0], cost[0], counts[0]) if single else (accuracy, cost, counts)


def _check_flops(exit_flops, num_exits: int) -> torch.Tensor:
    flops = torch.as_tensor(exit_flops, dtype=torch.float64).detach().cpu()
    if flops.shape != (num_exits,):
        raise ValueError(
            f"exit_flops: expected {num_exits} costs (one per exit), got shape {tuple(flops.shape)}"
        )
    if not torch.isfinite(flops).all() or (flops < 0).any():
        raise ValueError(f"exit_flops: expected finite non-negative costs, got {flops.tolist()}")
    return flops


def _prefix_candidates(confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default search of :func:`calibrate_for_budget`: for every prefix length m = 1..K,
    :func:`candidate_exit_fractions` (m) walked on the first m exits, exit m taking all
    that is left (threshold -inf) and the exits after it +inf (the last exit stays -inf,
    unreached). Returns (fractions [P, K] padded with zeros, thresholds [P, K])."""
    num_exits = confidence.shape[0]
    all_fractions, all_thresholds = [], []
    for m in range(1, num_exits + 1):
        fractions = candidate_exit_fractions(m)
        thresholds = torch.full((fractions.shape[0], num_exits), math.inf, dtype=confidence.dtype)
        thresholds[:, :m] = _thresholds_for_fractions(confidence[:m], fractions)  # its last: -inf
        thresholds[:, -1] = -math.inf
        all_fractions.append(torch.nn.functional.pad(fractions, (0, num_exits - m)))
        all_thresholds.append(thresholds)
    return torch.cat(all_fractions), torch.cat(all_thresholds)


def calibrate_for_budget(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    exit_flops,
    budget: float,
    *,
    exit_fractions: torch.Tensor | None = None,
) -> BudgetCalibration:
    """The most accurate thresholds (on the held-out split) whose mean cost is <= ``budget``.

    Args:
        confidence: [K, N] float held-out confidences.
        correct: [K, N] bool, whether exit k's prediction of sample i is right.
        exit_flops: [K] per-sample cost of leaving at each exit (cumulative, increasing).
        budget: target mean cost per sample, in exit_flops' unit; must lie in
            [exit_flops[0], exit_flops[-1]] (the cheapest exit ... the full network).
        exit_fractions: optional [P, K] candidates instead of the default search
            (:func:`candidate_exit_fractions` on every prefix of the exits).

    Ties in accuracy go to the cheaper candidate.
    """
    confidence = _check_confidence(confidence)
    num_exits = confidence.shape[0]
    flops = _check_flops(exit_flops, num_exits)
    if isinstance(budget, torch.Tensor):
        budget = float(budget)
    if not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget: expected a finite number of FLOPs per sample, got {budget!r}")
    cheapest, full = float(flops.min()), float(flops[-1])
    if budget < cheapest * (1 - 1e-12):
        raise ValueError(
            f"budget: {budget:.6g} FLOPs per sample is below the cheapest exit "
            f"({cheapest:.6g} FLOPs); the model's range is [{cheapest:.6g}, {full:.6g}]"
        )
    if budget > full * (1 + 1e-9):
        raise ValueError(
            f"budget: {budget:.6g} FLOPs per sample is above the full network "
            f"({full:.6g} FLOPs); the model's range is [{cheapest:.6g}, {full:.6g}] "
            "(use thresholds of +inf for full-depth inference)"
        )
    if exit_fractions is None:
        candidates, thresholds = _prefix_candidates(confidence)
    else:
        candidates = _check_fractions(exit_fractions, num_exits)
        thresholds = _thresholds_for_fractions(confidence, candidates)
    accuracy, cost, counts = simulate_thresholds(confidence, correct, flops, thresholds)
    feasible = cost <= budget * (1 + 1e-12)
    if not feasible.any():
        raise ValueError(
            f"budget: no candidate allocation meets {budget:.6g} FLOPs per sample on the held-out "
            f"split (cheapest candidate costs {float(cost.min()):.6g})"
        )
    # Best accuracy, then lowest cost: order by (accuracy desc, cost asc) among the feasible.
    score = torch.where(feasible, accuracy, torch.full_like(accuracy, -1.0))
    best_accuracy = score.max()
    ties = (score == best_accuracy).nonzero().squeeze(1)
    best = int(ties[cost[ties].argmin()])
    return BudgetCalibration(
        thresholds=thresholds[best],
        exit_fractions=candidates[best],
        mean_flops=float(cost[best]),
        accuracy=float(accuracy[best]),
        exit_counts=counts[best],
        budget=float(budget),
    )
