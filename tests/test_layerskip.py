"""LayerSkip's loss scales and curricula (exact schedules, transcribed by hand from
torchtune/modules/early_exit_loss.py), and AnytimeLinearLoss with every weighting."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann_kernels import AnytimeLinearLoss
from ann_kernels.losses import LayerSkipWeighting, layerskip_loss_scales
from ann_kernels.losses.layerskip import LayerSkipCurriculum
from tests.utils import requires_ext


def _norm(v):
    return [x / sum(v) for x in v]


@pytest.mark.parametrize("scale,raw", [
    ("uniform", [1, 1, 1, 1]),
    ("linear", [1, 3, 6, 8]),
    ("sum", [1, 4, 10, 18]),
    ("sqrt", [1, math.sqrt(3), math.sqrt(6), math.sqrt(8)]),
    ("inverse", [1, 1 / 3, 1 / 6, 1 / 8]),
    ("inv_sqrt", [1, 1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(8)]),
])
def test_loss_scales(scale, raw):
    ids = [0, 2, 5, 7]  # layers 1, 3, 6, 8 (1-based) of an 8-layer model
    assert layerskip_loss_scales(ids, 8, scale) == pytest.approx(_norm(raw))
    # e_scale multiplies every exit but the last layer's, before normalising.
    scaled = [r * (0.5 if i < 7 else 1.0) for r, i in zip(raw, ids)]
    assert layerskip_loss_scales(ids, 8, scale, e_scale=0.5) == pytest.approx(_norm(scaled))


def test_torchtune_names_are_accepted_and_bad_names_rejected():
    assert layerskip_loss_scales([0, 1], 2, "sum_l") == layerskip_loss_scales([0, 1], 2, "sum")
    with pytest.raises(ValueError, match="scale"):
        layerskip_loss_scales([0], 1, "cubic")


def test_rotational_schedule():
    c = LayerSkipCurriculum([True, False, False, True, False], "rot")
    got = []
    for _ in range(6):
        got.append(c.get())
        c.step()
    # np.roll(mask, 1) each step; last layer forced on by get().
    assert got == [
        [True, False, False, True, True],
        [False, True, False, False, True],
        [True, False, True, False, True],
        [False, True, False, True, True],
        [False, False, True, False, True],
        [True, False, False, True, True],
    ]
    no_last = LayerSkipCurriculum([True, False, False, True, False], "rot", train_last_layer=False)
    assert no_last.get() == [True, False, False, True, False]


def test_gradual_schedule():
    n, max_steps = 4, 8
    c = LayerSkipCurriculum([True, True, False, True], "gradual", max_steps=max_steps)
    got = [c.get()]
    for _ in range(6):
        c.step()
        got.append(c.get())
    # layer i on once step/max_steps >= 0.5 * (n - i) / n (steps counted before the increment)
    # and it was on initially; before the first step only the forced last layer.
    expect = [[False, False, False, True]]
    for step in range(6):
        frac = step / max_steps
        expect.append([frac >= 0.5 * (n - i) / n and init for i, init in enumerate([True, True, False, True])])
        expect[-1][-1] = True
    assert got == expect
    assert got[-1] == [True, True, False, True]  # step 5: 5/8 >= 0.5 -> all initially-on layers
    assert got[3] == [False, False, False, True]  # step 2: 0.25 < 0.5 * 3/4; layer 3 forced anyway


def test_gradual_needs_max_steps():
    with pytest.raises(ValueError, match="max_steps"):
        LayerSkipCurriculum([True], "gradual")


def test_weighting_is_zero_off_the_curriculum_and_state_round_trips():
    w = LayerSkipWeighting(3, exit_layers=[1, 3, 5], num_layers=6, scale="sum", curriculum="rot")
    first = w.weights_for_step()
    assert first.tolist() == pytest.approx(_norm([2, 6, 12]))
    w.after_step(None)
    # mask over 6 layers [F,T,F,T,F,T] rolled -> [T,F,T,F,T,F], last forced: only exit 2 (layer 5).
    assert w.weights_for_step().tolist() == [0.0, 0.0, 1.0]
    clone = LayerSkipWeighting(3, exit_layers=[1, 3, 5], num_layers=6, scale="sum", curriculum="rot")
    clone.load_state_dict(w.state_dict())
    assert torch.equal(clone.weights_for_step(), w.weights_for_step())


def test_curriculum_layers_start_mask():
    w = LayerSkipWeighting(3, curriculum="rot", curriculum_layers=[0])
    seq = []
    for _ in range(3):
        seq.append(w.weights_for_step().tolist())
        w.after_step(None)
    # masks [T,F,F] -> [F,T,F] -> [F,F,T], last always on; uniform scales over the active exits
    assert seq == [[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]


def _lm(K=3, N=12, H=8, V=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) * 0.3)
        head.bias.copy_(torch.randn(V, generator=gen) * 0.1)
    hidden = [torch.randn(N, H, generator=gen, requires_grad=True) for _ in range(K)]
    target = torch.randint(0, V, (N,), generator=gen)
    return head, hidden, target


def _eager(head, hidden, target, weights):
    return sum(w * F.cross_entropy(head(h), target) for w, h in zip(weights, hidden))


@requires_ext
@pytest.mark.parametrize("weighting,kwargs", [
    ("const", {}), ("linear", {}), ("sieve", {}), ("half_end", {}), ("eann_sieve", {}),
    ("layerskip", {"scale": "sqrt"}), ("layerskip", {"scale": "sum", "curriculum": "rot"}),
])
def test_anytime_linear_loss_matches_eager(weighting, kwargs):
    head, hidden, target = _lm()
    loss_fn = AnytimeLinearLoss(head, 3, weighting, **kwargs)
    for _ in range(3):  # several steps: curricula move
        weights = loss_fn.weighting.weights_for_step().tolist()
        loss = loss_fn(hidden, target)
        want = _eager(head, hidden, target, weights)
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        g = torch.autograd.grad(loss, [*hidden, head.weight, head.bias])
        gw = torch.autograd.grad(want, [*hidden, head.weight, head.bias], allow_unused=True)
        for a, b in zip(g, gw):
            torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-5)
        assert loss_fn.weights.tolist() == pytest.approx(weights)


def _per_exit_ce(head, hidden, target) -> list[float]:
    """Each exit's mean cross-entropy, float64 (the oracle for per-exit losses)."""
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    return [F.cross_entropy(F.linear(h.detach().double(), weight, bias), target).item() for h in hidden]


@requires_ext
def test_anytime_linear_loss_adaloss_two_steps_against_the_hand_formula():
    """AdaLoss's running average over two steps (ema <- L_1, then 0.9 ema + 0.1 L_2, the original's
    momentum), and the weights recomputed from it after the update step (w = 1/ema + 1e-8, divided
    by its max, then 0.93 w + 0.07): adaloss.py's docstring, written out by hand."""
    head, hidden, target = _lm(seed=1)
    _, hidden2, target2 = _lm(seed=4)
    ada = AnytimeLinearLoss(head, 3, "adaloss", update_every=2)
    loss1 = ada(hidden, target)
    l1 = _per_exit_ce(head, hidden, target)
    assert loss1.item() == pytest.approx(sum(l1), rel=1e-5)  # all ones before the first update
    assert ada.weighting.ema.tolist() == pytest.approx(l1, rel=1e-5)
    loss2 = ada(hidden2, target2)
    l2 = _per_exit_ce(head, hidden2, target2)
    assert loss2.item() == pytest.approx(sum(l2), rel=1e-5)  # still ones: the update comes after step 2
    ema = [0.9 * a + 0.1 * b for a, b in zip(l1, l2)]
    assert ada.weighting.ema.tolist() == pytest.approx(ema, rel=1e-5)
    inv = [1 / e + 1e-8 for e in ema]
    want = [0.93 * w / max(inv) + 0.07 for w in inv]
    assert ada.weighting.weights_for_step().tolist() == pytest.approx(want, rel=1e-5)
    loss3 = ada(hidden, target)
    assert loss3.item() == pytest.approx(sum(w * l for w, l in zip(want, l1)), rel=1e-5)


@requires_ext
def test_anytime_linear_loss_oscillating_matches_eager():
    head, hidden, target = _lm(seed=1)
    torch.manual_seed(0)
    osc = AnytimeLinearLoss(head, 3, "oscillating")
    loss = osc(hidden, target)
    torch.testing.assert_close(loss, _eager(head, hidden, target, osc.weights.tolist()), atol=1e-5, rtol=1e-5)


@requires_ext
def test_anytime_linear_loss_sdn_and_ge_against_hand_weights():
    """SDN (baselines.py, Kaya et al.'s schedule): caps k/K = [1/3, 2/3, 1], start 0.01; at epoch e
    of E the internal exits weigh min(cap, 0.01 + cap e / E), the last 1. GE is CONST weights (its
    gradient rescaling lives on the model, installed by the Trainer)."""
    head, hidden, target = _lm(seed=5)
    ce = _per_exit_ce(head, hidden, target)
    sdn = AnytimeLinearLoss(head, 3, "sdn")
    for epoch, total, weights in [(0, 2, [0.01, 0.01, 1.0]), (1, 2, [0.01 + 1 / 6, 0.01 + 1 / 3, 1.0]),
                                  (2, 2, [1 / 3, 2 / 3, 1.0])]:
        if epoch:
            sdn.weighting.set_epoch(epoch, total)
        loss = sdn(hidden, target)
        assert sdn.weights.tolist() == pytest.approx(weights, rel=1e-6)
        assert loss.item() == pytest.approx(sum(w * c for w, c in zip(weights, ce)), rel=1e-5)
    ge = AnytimeLinearLoss(head, 3, "ge")
    assert ge.weighting.gradient_equilibrium is True
    assert ge(hidden, target).item() == pytest.approx(sum(ce), rel=1e-5)
    assert ge.weights.tolist() == [1.0, 1.0, 1.0]


@requires_ext
def test_anytime_linear_loss_per_exit_heads_and_leading_shape():
    heads = [nn.Linear(8, 20) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 5, 8, generator=gen)  # [K, B, S, H]
    target = torch.randint(0, 20, (3, 5), generator=gen)
    loss = AnytimeLinearLoss(heads, 2, [0.5, 1.0])(hidden, target)
    want = sum(w * F.cross_entropy(h(x.reshape(-1, 8)), target.reshape(-1))
               for w, h, x in zip([0.5, 1.0], heads, hidden))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_anytime_linear_loss_bad_args():
    with pytest.raises(TypeError, match="lm_head"):
        AnytimeLinearLoss(nn.Conv1d(1, 1, 1), 2)
    with pytest.raises(ValueError, match="lm_head"):
        AnytimeLinearLoss([nn.Linear(2, 3)] * 3, 2)


@requires_ext
def test_anytime_linear_loss_schemes_that_need_logits_fall_back_with_a_warning():
    """IMTA's distillation weights the logits themselves: they are materialised (warned)."""
    from ann_kernels import AnytimeLoss

    head, hidden, target = _lm(seed=3)
    fused = AnytimeLinearLoss(head, 3, "imta_kd")
    with pytest.warns(RuntimeWarning, match="materialising"):
        loss = fused(hidden, target)
    want = AnytimeLoss(3, "imta_kd")([head(h) for h in hidden], target)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for name in ("sdn", "ge"):  # weight schedules: fused path, no warning (hand values above)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            AnytimeLinearLoss(head, 3, name)(hidden, target)
