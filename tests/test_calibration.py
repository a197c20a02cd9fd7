"""MSDNet threshold calibration: hand-worked examples, a transcription of MSDNet's own walk
(kalviny/MSDNet-PyTorch, adaptive_inference.py, Tester.dynamic_eval_find_threshold) as the
oracle of the exits, thresholds in the gap below a sample (robust to rounding), the budget
search, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ann_kernels import calibrate_for_budget, calibrate_thresholds
from ann_kernels.inference.calibration import (
    candidate_exit_fractions,
    geometric_exit_fractions,
    simulate_thresholds,
)

INF = math.inf

# Three exits, six held-out samples (rows = exits).
CONFIDENCE = torch.tensor(
    [
        [0.90, 0.20, 0.80, 0.40, 0.60, 0.10],
        [0.50, 0.70, 0.30, 0.95, 0.60, 0.65],
        [0.99, 0.99, 0.99, 0.99, 0.99, 0.99],
    ]
)


def msdnet_thresholds(confidence: torch.Tensor, fractions) -> list[float]:
    """Transcription of MSDNet's Tester.dynamic_eval_find_threshold (T[k] = the confidence of
    the floor(n p_k)-th most confident sample not filtered yet; 1e8 = nobody; the last -1e8),
    with this project's floor guard against binary rounding."""
    m, n = confidence.shape
    conf = confidence.tolist()
    filtered = [False] * n
    thresholds = [1e8] * m
    for k in range(m - 1):
        out_n, count = math.floor(n * float(fractions[k]) + 1e-9), 0
        for i in sorted(range(n), key=lambda j: -conf[k][j]):
            if not filtered[i]:
                count += 1
                if count == out_n:
                    thresholds[k] = conf[k][i]
                    break
        filtered = [f or conf[k][i] >= thresholds[k] for i, f in enumerate(filtered)]
    thresholds[m - 1] = -1e8
    return thresholds


def exits_of(confidence: torch.Tensor, thresholds) -> list[int]:
    """The first exit k with confidence[k] >= thresholds[k], per sample (plain Python)."""
    conf, t = confidence.tolist(), [float(v) for v in thresholds]
    return [next(k for k in range(len(t)) if k == len(t) - 1 or conf[k][i] >= t[k]) for i in range(len(conf[0]))]


def test_hand_worked_equal_fractions():
    # p = 1/3 each: floor(6/3) = 2 per exit.
    # exit 0: sorted 0.9 (s0), 0.8 (s2) -> MSDNet's T0 = 0.8; s0, s2 exit. The next lower
    #   confidence at exit 0 is 0.6: the threshold is the midpoint 0.7.
    # exit 1: remaining s1 .7, s3 .95, s4 .6, s5 .65 -> 2nd most confident: 0.7 (MSDNet's T1);
    #   s1, s3 exit. Next lower at exit 1: 0.65 -> 0.675.
    # exit 2: -inf (takes s4, s5).
    thresholds = calibrate_thresholds(CONFIDENCE, [1 / 3, 1 / 3, 1 / 3])
    assert thresholds.tolist() == pytest.approx([0.7, 0.675, -INF])
    assert thresholds.dtype == CONFIDENCE.dtype
    assert exits_of(CONFIDENCE, thresholds) == exits_of(CONFIDENCE, torch.tensor([0.8, 0.7, -INF])) == [0, 1, 0, 1, 2, 2]


def test_hand_worked_zero_fraction_gives_inf():
    # p0 = 0: nobody leaves at exit 0 (+inf); exit 1: floor(6 * 0.5) = 3 of all six -> 0.65
    # (MSDNet's), next lower 0.6 -> 0.625.
    thresholds = calibrate_thresholds(CONFIDENCE, [0.0, 0.5, 0.5])
    assert thresholds.tolist() == pytest.approx([INF, 0.625, -INF])


def test_ties_exit_together_and_too_few_remaining_gives_inf():
    confidence = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.1, 0.1], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.0] * 6])
    # exit 0: count 1 -> MSDNet's T0 = 0.5 and all four tied samples leave (>=); the next
    #   lower confidence is 0.1 -> 0.3, the same four leave.
    # exit 1: count floor(6 * 4/6) = 4 > 2 remaining -> +inf (MSDNet's rule).
    thresholds = calibrate_thresholds(confidence, [1 / 6, 4 / 6, 1 / 6])
    assert thresholds.tolist() == pytest.approx([0.3, INF, -INF])
    assert exits_of(confidence, thresholds) == [0, 0, 0, 0, 2, 2]


def test_floor_is_robust_to_binary_rounding():
    # 100 * 0.29 = 28.999999999999996 in binary floating point; MSDNet's floor means 29: the
    # 29th confidence (index 28) is the last to exit, the threshold lies between it and the 30th.
    confidence = torch.linspace(1.0, 0.01, 100).unsqueeze(0).repeat(2, 1)
    thresholds = calibrate_thresholds(confidence, [0.29, 0.71])
    assert confidence[0, 29] < thresholds[0] < confidence[0, 28]
    assert float(thresholds[0]) == pytest.approx((float(confidence[0, 28]) + float(confidence[0, 29])) / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_exits_as_msdnet_and_no_sample_on_a_threshold(seed):
    """The calibration split's exits equal those of MSDNet's own walk (transcribed), for
    MSDNet's geometric family; and a calibration sample's exit no longer flips when its
    confidence moves by one ulp either way (the rounding of a GEMM at another batch size),
    where MSDNet's thresholds, which sit on a sample, flip at least one sample."""
    confidence, _, _ = synthetic_held_out(k=4, n=300, seed=seed)
    up = torch.nextafter(confidence, torch.full_like(confidence, 2.0))
    down = torch.nextafter(confidence, torch.full_like(confidence, -2.0))
    msdnet_flips = 0
    for ratio in (0.25, 0.5, 1.0, 1.5):
        fractions = geometric_exit_fractions(4, ratio)
        ours = calibrate_thresholds(confidence, fractions)
        theirs = msdnet_thresholds(confidence, fractions.tolist())
        exits = exits_of(confidence, ours)
        assert exits == exits_of(confidence, theirs)
        assert exits_of(up, ours) == exits == exits_of(down, ours)
        msdnet_flips += exits_of(down, theirs) != exits
    assert msdnet_flips > 0  # the oracle can tell: MSDNet's thresholds sit on samples


def test_simulation_matches_hand_count():
    correct = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    flops = torch.tensor([1.0, 2.0, 4.0])
    thresholds = torch.tensor([0.8, 0.7, -INF])
    accuracy, cost, counts = simulate_thresholds(CONFIDENCE, correct, flops, thresholds)
    # s0, s2 at exit 0 (both right); s1, s3 at exit 1 (right); s4, s5 at exit 2 (right).
    assert counts.tolist() == [2, 2, 2]
    assert float(accuracy) == pytest.approx(1.0)
    assert float(cost) == pytest.approx((2 * 1 + 2 * 2 + 2 * 4) / 6)


def test_geometric_family():
    p = geometric_exit_fractions(4, 0.5)
    expected = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    assert torch.allclose(p, expected / expected.sum())
    assert torch.allclose(geometric_exit_fractions(3, 1.0), torch.full((3,), 1 / 3, dtype=torch.float64))
    candidates = candidate_exit_fractions(5)
    assert torch.allclose(candidates.sum(dim=1), torch.ones(len(candidates), dtype=torch.float64))


def synthetic_held_out(k=5, n=2000, seed=0):
    """Later exits more confident and more often right, like a trained ANN."""
    gen = torch.Generator().manual_seed(seed)
    difficulty = torch.rand(n, generator=gen)
    skill = torch.linspace(0.3, 0.9, k).unsqueeze(1)
    confidence = (skill - difficulty + 0.1 * torch.randn(k, n, generator=gen)).sigmoid()
    correct = (skill + 0.2 * torch.randn(k, n, generator=gen)) > difficulty
    flops = torch.tensor([float(2**j) for j in range(k)])
    return confidence, correct, flops


@pytest.mark.parametrize("fraction_of_full", [0.1, 0.3, 0.6, 1.0])
def test_budget_is_met_and_beats_every_msdnet_member(fraction_of_full):
    confidence, correct, flops = synthetic_held_out()
    budget = max(float(flops[0]), fraction_of_full * float(flops[-1]))
    result = calibrate_for_budget(confidence, correct, flops, budget)
    assert result.mean_flops <= budget + 1e-9
    accuracy, cost, _ = simulate_thresholds(confidence, correct, flops, result.thresholds)
    assert float(accuracy) == pytest.approx(result.accuracy) and float(cost) == pytest.approx(
        result.mean_flops
    )
    assert result.thresholds[-1] == -INF
    for i in range(1, 40):  # MSDNet's own search grid
        thresholds = calibrate_thresholds(confidence, geometric_exit_fractions(5, i / 20))
        acc, c, _ = simulate_thresholds(confidence, correct, flops, thresholds)
        if float(c) <= budget:
            assert result.accuracy >= float(acc) - 1e-12


def test_accuracy_grows_with_budget_and_edges():
    confidence, correct, flops = synthetic_held_out(seed=1)
    budgets = torch.linspace(float(flops[0]), float(flops[-1]), 7).tolist()
    accuracies = [calibrate_for_budget(confidence, correct, flops, b).accuracy for b in budgets]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(accuracies))
    cheapest = calibrate_for_budget(confidence, correct, flops, float(flops[0]))
    assert cheapest.mean_flops == pytest.approx(float(flops[0]))
    assert cheapest.exit_counts[0] == confidence.shape[1]


def test_bad_inputs_name_the_argument():
    confidence, correct, flops = synthetic_held_out(k=3, n=50)
    with pytest.raises(ValueError, match="budget.*below the cheapest exit"):
        calibrate_for_budget(confidence, correct, flops, 0.5 * float(flops[0]))
    with pytest.raises(ValueError, match="budget.*above the full network"):
        calibrate_for_budget(confidence, correct, flops, 2 * float(flops[-1]))
    with pytest.raises(ValueError, match="budget"):
        calibrate_for_budget(confidence, correct, flops, math.nan)
    with pytest.raises(ValueError, match="exit_flops"):
        calibrate_for_budget(confidence, correct, flops[:2], 2.0)
    with pytest.raises(ValueError, match="correct"):
        calibrate_for_budget(confidence, correct[:, :10], flops, 2.0)
    with pytest.raises(ValueError, match="exit_fractions"):
        calibrate_thresholds(confidence, [0.5, 0.5])
    with pytest.raises(ValueError, match="exit_fractions"):
        calibrate_thresholds(confidence, [0.6, 0.6, 0.1])
    with pytest.raises(ValueError, match="exit_fractions"):
        calibrate_thresholds(confidence, [-0.1, 0.5, 0.5])
    with pytest.raises(ValueError, match="confidence"):
        calibrate_thresholds(confidence[0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        calibrate_thresholds(torch.empty(3, 0), [0.2, 0.2, 0.6])


@pytest.mark.parametrize("fraction_of_full", [0.05, 0.2, 0.5])
def test_search_covers_every_prefix_of_the_exits(fraction_of_full):
    """At any budget the calibration is at least as accurate as calibrating the first m exits
    alone (as if the network ended at exit m): what makes a sequence of many exits (an
    EANN) no worse at low budgets than its first member."""
    confidence, correct, flops = synthetic_held_out(k=8, n=1500, seed=3)
    budget = max(float(flops[0]), fraction_of_full * float(flops[-1]))
    full = calibrate_for_budget(confidence, correct, flops, budget)
    for m in range(1, 8):
        if float(flops[0]) > budget or budget > float(flops[m - 1]) * (1 + 1e-9):
            continue
        prefix = calibrate_for_budget(confidence[:m], correct[:m], flops[:m], budget)
        assert full.accuracy >= prefix.accuracy - 1e-12
    # and the thresholds it returns run as such: exits after the chosen prefix are never reached
    accuracy, cost, counts = simulate_thresholds(confidence, correct, flops, full.thresholds)
    assert float(accuracy) == pytest.approx(full.accuracy) and float(cost) <= budget * (1 + 1e-12)
    last_used = int(counts.nonzero().max())
    assert torch.all(counts[last_used + 1:] == 0)
    # a superset of MSDNet's own search (all K exits) can only do better
    msdnet_only = calibrate_for_budget(confidence, correct, flops, budget,
                                       exit_fractions=candidate_exit_fractions(8))
    assert full.accuracy >= msdnet_only.accuracy - 1e-12


# ---------------------------------------------------------------------------- devices


def test_device_inputs_give_the_independent_answer(device):
    """Confidences on ``device`` (CPU included) calibrate to what an independent plain-Python
    oracle gives: the exits of MSDNet's transcribed walk, and for a budget the best held-out
    accuracy over every candidate fraction vector within the budget, each candidate's
    accuracy and cost counted sample by sample."""
    confidence, correct, flops = synthetic_held_out(k=4, n=200, seed=5)
    fractions = [0.3, 0.3, 0.2, 0.2]
    on_dev = calibrate_thresholds(confidence.to(device), fractions).cpu()
    assert exits_of(confidence, on_dev) == exits_of(confidence, msdnet_thresholds(confidence, fractions))
    budget = 0.4 * float(flops[-1])
    result = calibrate_for_budget(confidence.to(device), correct.to(device), flops.to(device), budget)
    right, cost = correct.tolist(), flops.tolist()
    best = -1.0
    for m in range(1, 5):  # the network cut after exit m - 1, which takes everyone left
        for c in candidate_exit_fractions(m).tolist():
            thresholds = msdnet_thresholds(confidence[:m], c) + [1e8] * (4 - m)
            exits = exits_of(confidence, thresholds[:3] + [-1e8])
            mean_cost = sum(cost[e] for e in exits) / len(exits)
            if mean_cost <= budget:
                best = max(best, sum(right[e][i] for i, e in enumerate(exits)) / len(exits))
    assert result.mean_flops <= budget
    assert result.accuracy == pytest.approx(best, abs=1e-12)
    exits = exits_of(confidence, result.thresholds.cpu())
    assert result.accuracy == pytest.approx(sum(right[e][i] for i, e in enumerate(exits)) / len(exits))


def test_calibrated_thresholds_run_as_simulated_by_the_op(device):
    """Thresholds calibrated on the op's own confidences (exit_confidence on ``device``), run
    stage by stage through the op on the same logits, send exactly the simulated number of
    samples to each exit."""
    from ann_kernels.ops.early_exit import early_exit_step, exit_confidence

    gen = torch.Generator().manual_seed(6)
    k, n, c = 4, 400, 10
    logits = [(s * torch.randn(n, c, generator=gen)).to(device) for s in (1.0, 2.0, 3.0, 4.0)]
    confidence = torch.stack([exit_confidence(z)[0] for z in logits])
    correct = torch.stack([z.argmax(1) for z in logits]).cpu() == 0
    flops = torch.tensor([1.0, 2.0, 3.0, 4.0])
    result = calibrate_for_budget(confidence, correct, flops, 2.0)
    _, _, expected_counts = simulate_thresholds(confidence, correct, flops, result.thresholds)
    prediction = torch.empty(n, dtype=torch.int64, device=device)
    exit_index = torch.empty(n, dtype=torch.int64, device=device)
    conf_out = torch.empty(n, device=device)
    active = torch.arange(n, device=device)
    for j in range(k):
        threshold = -INF if j == k - 1 else float(result.thresholds[j])
        step = early_exit_step(logits[j][active], active, None, prediction, exit_index, conf_out,
                               threshold=threshold, exit_id=j)
        active = step.survivor_index
    assert active.numel() == 0
    assert torch.bincount(exit_index.cpu(), minlength=k).tolist() == expected_counts.tolist()


def test_nan_confidences_are_never_counted_towards_an_exit():
    """A NaN confidence (non-finite logits) never passes a threshold, so calibration must
    not count it: asking exit 0 for 3 of 4 rows when only 2 are finite used to give
    threshold -inf there (every row, NaN ones included, left at the first exit)."""
    nan = float("nan")
    confidence = torch.tensor([[0.9, nan, 0.8, nan], [0.5, 0.6, 0.7, 0.8], [1.0, 1.0, 1.0, 1.0]])
    thresholds = calibrate_thresholds(confidence, [0.75, 0.25, 0.0])
    assert thresholds[0] == math.inf  # the count is unreachable among finite rows: nobody exits
    # exit 1: the most confident row still running (0.8), next lower 0.7 -> 0.75
    assert thresholds[1] == pytest.approx(0.75)
    assert thresholds[2] == -math.inf
    # Reachable among finite rows: the count-th finite confidence (0.8) is the lowest finite
    # one at exit 0 (NaN ranks below everything but is no neighbour): 0.8 - 2^-16.
    assert float(calibrate_thresholds(confidence, [0.5, 0.25, 0.0])[0]) == pytest.approx(0.8 - 2**-16, abs=1e-7)
