"""Weighting schemes, AdaLoss and the AnytimeLoss module against hand-worked values and
a pure-torch re-implementation of DESIGN.md's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ann_kernels.losses import (
    AdaLoss, AnytimeLoss, Oscillating, StaticWeighting, const_weights, eann_sieve_weights, half_end_weights,
    linear_weights, make_weighting, opt_weights, sieve_weights,
)
from tests.utils import make_logits, make_target


def per_exit_ce(heads, target, **kw):
    return torch.stack([F.cross_entropy(z.float(), target, **kw) for z in heads])


# --- 1. the static vectors for K = 8 ---------------------------------------------------------

def test_static_vectors_k8_exact():
    k = 8
    assert torch.equal(const_weights(k), torch.ones(8))
    assert opt_weights(k).tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert opt_weights(k, 2).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    torch.testing.assert_close(half_end_weights(k), torch.tensor([1 / 7] * 7 + [1.0]))
    lin = torch.tensor([0.25 + 0.75 * i / 7 for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(linear_weights(k), (lin * 3 / lin.sum()).float())
    assert linear_weights(k).sum().item() == pytest.approx(math.log2(8), rel=1e-6)
    # SIEVE: strides 1, 2, 4 mark [1,2,1,3,1,2,1,3]; w_K = 11; default: scaled so w_K = 1
    # (the original's default --normalize_weights last: sum 2); "log": sum log2 9.
    raw = torch.tensor([1, 2, 1, 3, 1, 2, 1, 11], dtype=torch.float64)
    sieve = sieve_weights(k)
    torch.testing.assert_close(sieve, (raw / 11).float())
    assert sieve[-1].item() == 1.0 and sieve.sum().item() == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(sieve, torch.tensor([.0909, .1818, .0909, .2727, .0909, .1818, .0909, 1.]),
                               atol=1e-4, rtol=0)
    log_sieve = sieve_weights(k, normalize="log")
    torch.testing.assert_close(log_sieve, (raw * math.log2(9) / raw.sum()).float())
    # EANN-SIEVE: the original's eann_sieve skips the normalisation step (log2(K+1) scale).
    es = eann_sieve_weights(k)
    assert es[:4].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(es[4:], log_sieve[4:])
    with pytest.raises(ValueError, match="normalize"):
        sieve_weights(k, normalize="sum")


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13])
def test_static_vectors_every_k(k):
    for fn in (const_weights, half_end_weights, linear_weights, sieve_weights, eann_sieve_weights, opt_weights):
        w = fn(k)
        assert w.shape == (k,) and w.dtype == torch.float32 and torch.isfinite(w).all() and (w >= 0).all()
        assert w[-1] > 0  # the final exit is always trained
    if k > 1:
        assert linear_weights(k).sum().item() == pytest.approx(math.log2(k), rel=1e-6)
        assert sieve_weights(k, normalize="log").sum().item() == pytest.approx(math.log2(k + 1), rel=1e-6)
        assert sieve_weights(k)[-1].item() == 1.0 and sieve_weights(k).sum().item() == pytest.approx(2.0, rel=1e-6)
        s = sieve_weights(k)
        assert s[-1].item() == pytest.approx(s[:-1].sum().item(), rel=1e-6)
    else:
        for fn in (half_end_weights, linear_weights, sieve_weights, eann_sieve_weights):
            assert fn(1).tolist() == [1.0]


# --- 2. AdaLoss step by step ---------------------------------------------------------------

def adaloss_expected(ema, base, eps=1e-8):
    w = base / (ema + eps)
    return w * base.sum() / w.sum()


LEGACY = dict(update_every=1, normalize="sum", gamma=0.0)  # our earlier defaults (momentum 0.99)


def test_adaloss_legacy_options_step_by_step():
    torch.manual_seed(0)
    k, n, c, m = 4, 33, 7, 0.9
    crit = AnytimeLoss(k, "adaloss", momentum=m, **LEGACY)
    ada = crit.weighting
    assert torch.isnan(ada.ema).all()
    ema = None
    for step in range(5):
        heads = make_logits(k, n, c, seed=step)
        for j, z in enumerate(heads):  # exits of very different difficulty
            z.data.mul_(0.3 * (j + 1))
        target = make_target(n, c, seed=step)
        per_exit = per_exit_ce(heads, target).detach()
        base = torch.ones(k)
        expected_w = base if ema is None else adaloss_expected(ema, base)
        loss = crit(heads, target)
        torch.testing.assert_close(crit.weights, expected_w)
        torch.testing.assert_close(loss, (expected_w * per_exit).sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(crit.last_per_exit, per_exit, rtol=1e-5, atol=1e-6)
        ema = per_exit.clone() if ema is None else m * ema + (1 - m) * per_exit
        torch.testing.assert_close(ada.ema, ema, rtol=1e-5, atol=1e-6)
        assert ada.steps.item() == step + 1
        assert crit.weights.sum().item() == pytest.approx(k, rel=1e-6)
    # harder exits (larger loss) get smaller weights
    assert torch.equal(torch.argsort(crit.weights, descending=True), torch.argsort(ada.ema))


def test_adaloss_gradient_is_weighted_sum():
    k, n, c = 3, 17, 10
    crit = AnytimeLoss(k, "adaloss", update_every=1)
    crit(make_logits(k, n, c, seed=5), make_target(n, c))  # sets the state
    heads = make_logits(k, n, c, seed=6)
    target = make_target(n, c, seed=2)
    loss = crit(heads, target)
    w = crit.weights.clone()
    grads = torch.autograd.grad(loss, heads)
    ref_heads = [z.detach().clone().requires_grad_() for z in heads]
    ref = (w * per_exit_ce(ref_heads, target)).sum()
    ref_grads = torch.autograd.grad(ref, ref_heads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert not w.requires_grad


def test_adaloss_options():
    ema = torch.tensor([2.0, 1.0, 0.5, 0.25])
    base = torch.tensor([1.0, 1.0, 2.0, 4.0])
    a = AdaLoss(4, base=base, **LEGACY)
    a.ema.copy_(ema)
    torch.testing.assert_close(a.weights_from_state(), adaloss_expected(ema, base))
    sm = AdaLoss(4, normalize="sum", final_extra=0.5, gamma=0.25)
    sm.ema.copy_(ema)
    w = adaloss_expected(ema, torch.ones(4))
    w[-1] += 0.5
    w = 0.75 * w + 0.25
    torch.testing.assert_close(sm.weights_from_state(), w * 4 / w.sum())
    # the default (the original's order): 1/ema + eps, max-normalise, final_extra, max-normalise,
    # then mix with gamma and do NOT renormalise
    mx = AdaLoss(4, final_extra=0.5, gamma=0.25)
    mx.ema.copy_(ema)
    raw = 1 / ema + 1e-8
    w = raw / raw.max()
    w[-1] += 0.5
    w = w / w.max()
    torch.testing.assert_close(mx.weights_from_state(), 0.75 * w + 0.25)
    # update_every=3: weights recomputed at steps 0, 3, 6, ...; held in between
    crit = AnytimeLoss(2, "adaloss", update_every=3, momentum=0.5)
    seen = []
    for step in range(7):
        crit(make_logits(2, 9, 5, seed=step), make_target(9, 5, seed=step))
        seen.append(crit.weights.clone())
    assert torch.equal(seen[0], torch.ones(2)) and torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])
    assert not torch.equal(seen[3], seen[2]) and torch.equal(seen[4], seen[3]) and torch.equal(seen[5], seen[3])
    assert not torch.equal(seen[6], seen[5])


def test_adaloss_nonfinite_loss_is_counted_not_stored():
    crit = AnytimeLoss(2, "adaloss", update_every=1)
    heads = make_logits(2, 4, 3)
    target = make_target(4, 3)
    crit(heads, target)
    ema_before = crit.weighting.ema.clone()
    bad = [make_logits(1, 4, 3, seed=7)[0], torch.full((4, 3), float("nan"), requires_grad=True)]
    crit(bad, target)
    assert crit.weighting.nonfinite_count.tolist() == [0, 1]
    assert crit.weighting.ema[1] == ema_before[1] and crit.weighting.ema[0] != ema_before[0]


@pytest.mark.parametrize("normalize", ["max", "sum"])
def test_adaloss_all_ignored_rows_give_zero_not_nan(normalize):
    crit = AnytimeLoss(3, "adaloss", update_every=1, normalize=normalize)
    target = torch.full((5,), -100)
    for _ in range(2):  # the second step computes weights from ema = [0, 0, 0]
        loss = crit(make_logits(3, 5, 4), target)
        assert loss.item() == 0.0 and torch.isfinite(crit.weights).all()


# --- 3. oscillating and the module ---------------------------------------------------------

def test_oscillating_draws_one_exit_per_step():
    torch.manual_seed(0)
    osc = Oscillating(5, base="linear")
    base = linear_weights(5)
    counts = torch.zeros(5)
    for step in range(400):
        w = osc.weights_for_step()
        osc.after_step(None)
        extra = w - base
        assert (extra > 0).sum() == 1
        torch.testing.assert_close(extra.max(), base.sum() / 2)
        if step == 0:  # the original's first selection is the last exit (init_select_idx)
            assert extra.argmax().item() == 4
        counts[extra.argmax()] += 1
    # frequencies follow base / sum(base) (the last exit is 4x the first at 1.0 vs 0.25)
    assert counts[-1] > 2.5 * counts[0]


@pytest.mark.parametrize("weighting", ["const", "linear", "half_end", "sieve", "eann_sieve", "opt"])
def test_static_scheme_loss_matches_reference(weighting):
    k, n, c = 4, 21, 10
    heads = make_logits(k, n, c)
    target = make_target(n, c, ignore_frac=0.2)
    crit = AnytimeLoss(k, weighting, label_smoothing=0.1)
    loss = crit(heads, target)
    w = make_weighting(weighting, k).base
    ref = (w * per_exit_ce(heads, target, label_smoothing=0.1)).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crit.weights, w)


def test_module_accepts_stacked_and_explicit_weights():
    heads = make_logits(3, 6, 4)
    target = make_target(6, 4)
    crit = AnytimeLoss(3, [0.5, 0.0, 2.0])
    a = crit(torch.stack(heads), target)
    b = crit(heads, target)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, (torch.tensor([0.5, 0.0, 2.0]) * per_exit_ce(heads, target)).sum())
    assert crit.last.per_sample.shape == (3, 6) and crit.last.confidence.shape == (3, 6)


def test_state_dict_round_trips_exactly():
    k = 3
    a = AnytimeLoss(k, "adaloss", update_every=2)
    for s in range(3):
        a(make_logits(k, 8, 5, seed=s), make_target(8, 5, seed=s))
    b = AnytimeLoss(k, "adaloss", update_every=2)
    b.load_state_dict(a.state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x.nan_to_num(-1), y.nan_to_num(-1)), name
    heads, target = make_logits(k, 8, 5, seed=9), make_target(8, 5, seed=9)
    assert torch.equal(a(heads, target), b(heads, target))
    assert torch.equal(a.weighting.ema, b.weighting.ema)
    assert set(a.state_dict()) >= {"weighting.ema", "weighting.steps", "weighting.nonfinite_count", "last_weights"}


def test_scheme_object_is_used_as_is():
    scheme = AdaLoss(4, momentum=0.5)
    crit = AnytimeLoss(4, scheme)
    assert crit.weighting is scheme
    assert isinstance(AnytimeLoss(2, "const").weighting, StaticWeighting)


# --- 4. bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: AnytimeLoss(0), r"num_exits: expected a positive integer, got 0"),
    (lambda: AnytimeLoss(3, "nope"), r"weighting: expected one of .*got 'nope'"),
    (lambda: AnytimeLoss(3, "adaloss", momentum=1.0), r"momentum: expected a value in \[0, 1\), got 1.0"),
    (lambda: AnytimeLoss(3, "adaloss", normalize="mean"), r"normalize: expected one of"),
    (lambda: AnytimeLoss(3, "adaloss", update_every=0), r"update_every: expected a positive integer, got 0"),
    (lambda: AnytimeLoss(3, "adaloss", eps=0), r"eps: expected a positive number"),
    (lambda: AnytimeLoss(3, "adaloss", gamma=2), r"gamma: expected a value in \[0, 1\]"),
    (lambda: AnytimeLoss(3, "adaloss", base=[1, 2]), r"base: expected 3 weights"),
    (lambda: AnytimeLoss(3, "adaloss", base=[1, -2, 1]), r"base: expected finite non-negative"),
    (lambda: AnytimeLoss(3, [1.0, 2.0]), r"base: expected 3 weights"),
    (lambda: AnytimeLoss(3, "opt", index=3), r"index: expected an exit in 0..2, got 3"),
    (lambda: AnytimeLoss(3, "const", momentum=0.5), r"weighting 'const':"),
    (lambda: AnytimeLoss(3, AdaLoss(4)), r"the scheme has 4 exits but num_exits=3"),
    (lambda: AnytimeLoss(3, label_smoothing=1.5), r"label_smoothing: expected a value in \[0, 1\]"),
])
def test_bad_options_raise_clearly(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_wrong_number_of_exits_raises():
    crit = AnytimeLoss(3)
    with pytest.raises(ValueError, match=r"logits: expected 3 exits \(num_exits\), got 2"):
        crit(make_logits(2, 4, 5), make_target(4, 5))
    with pytest.raises(TypeError, match=r"logits: expected 3 exit tensors"):
        crit(make_logits(1, 4, 5)[0], make_target(4, 5))
    with pytest.raises(ValueError, match=r"target"):
        crit(make_logits(3, 4, 5), torch.tensor([0, 1, 2, 9]))


@pytest.mark.parametrize("weighting", ["const", "linear", "imta_kd", "l2w"])
@pytest.mark.parametrize("per_exit_weights", [False, True])
def test_sample_weights_pass_through_every_scheme(weighting, per_exit_weights):
    """AnytimeLoss(..)(logits, target, sample_weights=s): the scheme's loss with each sample's
    cross-entropy term multiplied by s (L2W: its predicted W times s), gradients w.r.t. s."""
    k, n, c = 3, 6, 5
    gen = torch.Generator().manual_seed(3)
    logits, target = make_logits(k, n, c), make_target(n, c)
    shape = (k, n) if per_exit_weights else (n,)
    s = torch.rand(shape, generator=gen).add_(0.25).requires_grad_(True)
    crit = AnytimeLoss(k, weighting)
    loss = crit(logits, target, sample_weights=s)
    if weighting == "l2w":
        w_exp = crit.weighting.last_sample_weights.detach()  # W * s, [K, N]
        plain = AnytimeLoss(k, "l2w")
        plain.load_state_dict(crit.state_dict())
        plain(logits, target)
        torch.testing.assert_close(w_exp, plain.weighting.last_sample_weights.detach() * s.detach().expand(k, n))
        ref = (w_exp * torch.stack([F.cross_entropy(z.detach(), target, reduction="none") for z in logits])).sum() / n
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        return
    ce = torch.stack([F.cross_entropy(z, target, reduction="none") for z in logits])  # [K, N]
    ref = (crit.weights.view(k, 1) * s.expand(k, n) * ce).sum() / n
    if weighting == "imta_kd":  # the distillation term is not sample-weighted
        ref = ref + AnytimeLoss(k, weighting)(logits, target) - (crit.weights.view(k, 1) * ce).sum() / n
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, [s, *logits])
    want = torch.autograd.grad(ref, [s, *logits])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert got[0].abs().max() > 1e-3  # d loss / d s is not vacuous
