"""Our schemes against transcriptions of the original code (numpy / plain torch, written from
the reference repositories, not from our implementation):

- AdaLoss: EchoWho/AnytimeNeuralNetwork_public ``online_learn.py`` ``AdaptiveLossWeight``
  with ``anytime_network.py``'s parser defaults and initial weights; K = 6, 350 steps
  (three updates: before steps 101, 201 and 301);
- SIEVE / EANN-SIEVE / LINEAR / HALF_END: ``tensorpack/utils/anytime_loss.py``;
- the oscillating scheme (``--samloss 6``): ``FixedDistributionCPU`` + ``_build_graph``;
- weight decay: ``_build_graph``'s ``wd_cost``;
- exit costs: a FlopCounterMode run of the truncated network (every head on the way);
- gradient equilibrium: kalviny/IMTA ``models/msdnet_ge.py`` ``MSDNet.forward``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ann_kernels.losses import AnytimeLoss, Oscillating, eann_sieve_weights, half_end_weights, linear_weights
from ann_kernels.losses import sieve_weights
from ann_kernels.nn import MultiExitNetwork, enable_gradient_equilibrium, msdnet
from ann_kernels.nn.heads import PooledLinearHead
from ann_kernels.train.weight_decay import weight_decay_groups
from tests.utils import DEVICES, make_target


# --- transcriptions of the original code ----------------------------------------------------

class OriginalAdaptiveLossWeight:
    """online_learn.py AdaptiveLossWeight, the arithmetic of _after_run, in float64; the
    weight variable starts at [1.0] * K (anytime_network.py _get_select_idx)."""

    def __init__(self, K, gamma=0.07, update_per=100, momentum=0.9, final_extra=0.0):
        self.K, self.gamma, self.update_per, self.momentum, self.final_extra = K, gamma, update_per, momentum, \
            final_extra
        self.weight = np.ones(K)  # the TF variable the graph multiplies each cost by
        self.avg_losses = None

    def _after_run(self, losses):
        losses = np.asarray(losses, dtype=np.float64)
        if self.avg_losses is None:
            self.avg_losses = losses
            self.cnt = 0
        else:
            self.avg_losses = self.avg_losses * self.momentum + losses * (1 - self.momentum)
        self.cnt += 1
        if self.cnt % self.update_per == 0:
            self.cnt = 0
            w = 1. / self.avg_losses + 1e-8
            w /= np.max(w)
            w[-1] += self.final_extra
            w /= np.max(w)
            w = w * (1 - self.gamma) + np.ones(self.K, dtype=np.float32) * self.gamma
            self.weight = w


def original_sieve_loss_weights(N, last_weight_to_early_sum=1.0):
    if N == 1:
        return np.ones(1)
    weights = np.zeros(N)
    step = 1
    while step < N:
        weights[0:N:step] += 1.0
        step *= 2
    weights[0] = np.sum(weights[1:]) * last_weight_to_early_sum
    weights = np.flipud(weights)
    weights /= np.sum(weights) / np.log2(N + 1)
    return weights


def original_normalize_weights(weights, normalize):
    if normalize == "log":
        weights /= np.sum(weights) / np.log2(len(weights) + 1)
    elif normalize == "all":
        weights /= np.sum(weights)
    elif normalize == "last":
        weights /= weights[-1]
    return weights


def original_linear(N, a=0.25, b=1.0):
    weights = np.arange(N, dtype=np.float32) * ((b - a) / (N - 1.0)) + a
    return weights / (np.sum(weights) / np.log2(N))


def original_half_constant_half_optimal(N):
    weights = np.ones(N, dtype=np.float32)
    if N > 1:
        weights[-1] = N - 1
    return weights / float(N - 1)


# --- AdaLoss --------------------------------------------------------------------------------

def _drifting_logits(k, n, c, step, device):
    """Exits of different, slowly changing difficulty, so the weights really move."""
    g = torch.Generator().manual_seed(1000 + step)
    z = torch.randn(k, n, c, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.3 + 0.4 * j + 0.002 * step * (j % 3) for j in range(k)], dtype=torch.float64)
    return [(z[j] * scale[j]).float().to(device).requires_grad_() for j in range(k)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options,original", [
    ({}, {}),  # the defaults: the parser's (momentum 0.9, every 100 steps, gamma 0.07, final_extra 0)
    ({"final_extra": 0.5, "gamma": 0.3, "momentum": 0.99},
     {"final_extra": 0.5, "gamma": 0.3, "momentum": 0.99}),
    ({"update_every": 64}, {"update_per": 64}),
])
def test_adaloss_matches_the_original_step_by_step(device, options, original):
    k, n, c, steps = 6, 24, 5, 350
    crit = AnytimeLoss(k, "adaloss", **options).to(device)
    ref = OriginalAdaptiveLossWeight(k, **original)
    update_per = original.get("update_per", 100)
    seen = []
    for step in range(steps):
        heads = _drifting_logits(k, n, c, step, device)
        target = make_target(n, c, seed=step).to(device)
        loss = crit(heads, target)
        used = crit.weights.detach().cpu().double()
        # the weights this step trained with are the original's variable before _after_run
        np.testing.assert_allclose(used.numpy(), ref.weight, rtol=2e-5, atol=1e-7, err_msg=f"step {step}")
        per_exit = crit.last_per_exit.detach().cpu().double()
        torch.testing.assert_close(loss.detach().cpu().double(), (used * per_exit).sum(), rtol=1e-5, atol=1e-6)
        ref._after_run(per_exit.numpy())
        seen.append(used)
    # the timing: all ones for the first update_per steps, then piecewise constant, changing
    # exactly at steps update_per, 2 update_per, ... (0-based)
    assert all(torch.equal(w, torch.ones(k, dtype=torch.float64)) for w in seen[:update_per])
    for step in range(1, steps):
        changed = not torch.equal(seen[step], seen[step - 1])
        assert changed == (step % update_per == 0), step
    # gamma mixes without renormalising: max is exactly 1, min >= gamma
    last = seen[-1]
    assert last.max().item() == pytest.approx(1.0, abs=1e-6)
    assert last.min().item() >= crit.weighting.gamma - 1e-6


def test_adaloss_ema_is_updated_in_place_by_the_fused_op():
    k = 6
    crit = AnytimeLoss(k, "adaloss")
    ema = crit.weighting.ema
    ptr = ema.data_ptr()
    for step in range(3):
        crit(_drifting_logits(k, 8, 4, step, "cpu"), make_target(8, 4, seed=step))
    assert crit.weighting.ema.data_ptr() == ptr and torch.isfinite(ema).all()
    assert crit.weighting.steps.item() == 3


def test_adaloss_resume_keeps_the_update_timing():
    k = 6
    a, b = AnytimeLoss(k, "adaloss", update_every=10), AnytimeLoss(k, "adaloss", update_every=10)
    for step in range(15):
        a(_drifting_logits(k, 8, 4, step, "cpu"), make_target(8, 4, seed=step))
    b.load_state_dict(a.state_dict())
    for step in range(15, 35):
        heads = _drifting_logits(k, 8, 4, step, "cpu")
        a(heads, make_target(8, 4, seed=step))
        b([h.detach().clone().requires_grad_() for h in heads], make_target(8, 4, seed=step))
        assert torch.equal(a.weights, b.weights), step


# --- static vectors ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16])
def test_static_vectors_match_anytime_loss_py(k):
    # loss_weights(func_type=5) -> stack_loss_weights(stack=1, sieve) -> _normalize_weights("last")
    expected = original_normalize_weights(original_sieve_loss_weights(k), "last")
    np.testing.assert_allclose(sieve_weights(k).double().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(sieve_weights(k, normalize="log").double().numpy(),
                               original_sieve_loss_weights(k), rtol=1e-6)
    eann = original_sieve_loss_weights(k)
    eann[: k // 2] = 0.0
    np.testing.assert_allclose(eann_sieve_weights(k).double().numpy(), eann, rtol=1e-6)
    if k > 1:
        np.testing.assert_allclose(linear_weights(k).double().numpy(), original_linear(k), rtol=1e-6)
        np.testing.assert_allclose(half_end_weights(k).double().numpy(), original_half_constant_half_optimal(k),
                                   rtol=1e-6)


def test_oscillating_matches_samloss_6():
    """Step 1 adds weights_sum / sum_rand_ratio (= sum B / 2) to the last exit (init_select_idx);
    every later step to an exit drawn from B / sum B; B = SIEVE with w_K = 1."""
    k, steps = 6, 1500
    torch.manual_seed(0)
    crit = AnytimeLoss(k, "oscillating")
    base = torch.from_numpy(original_normalize_weights(original_sieve_loss_weights(k), "last").copy()).float()
    torch.testing.assert_close(crit.weighting.base, base)
    counts = np.zeros(k)
    for step in range(steps):
        crit(_drifting_logits(k, 4, 3, step % 7, "cpu"), make_target(4, 3, seed=step % 5))
        extra = (crit.weights - base).double()
        chosen = int(extra.argmax())
        expected = base.clone()
        expected[chosen] += base.sum() / 2
        torch.testing.assert_close(crit.weights, expected)
        if step == 0:
            assert chosen == k - 1
        else:
            counts[chosen] += 1
    freq = counts / counts.sum()
    p = (base / base.sum()).double().numpy()
    # 5 sigma of a multinomial frequency with 1499 draws
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / counts.sum())), (freq, p)
    assert isinstance(crit.weighting, Oscillating)


# --- weight decay ---------------------------------------------------------------------------

def _conv_head_network():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=True), nn.BatchNorm2d(3), nn.ReLU()),
              nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())]
    heads = [PooledLinearHead(3, 5, conv_channels=2), PooledLinearHead(4, 5)]
    return MultiExitNetwork(stages, heads)


def test_reference_weight_decay_groups_match_wd_cost():
    """One SGD step with our groups equals one plain-SGD step on loss + the original's wd_cost."""
    wd = 1e-2
    s = torch.tensor([0.25, 1.0])
    net = _conv_head_network()
    groups = weight_decay_groups(net, wd, "reference", s)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(ids) == len(set(ids))
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert decay_of[id(named["stages.0.0.weight"])] == wd            # conv kernel
    assert decay_of[id(named["stages.0.0.bias"])] == 0.0             # conv bias: not '/W'
    assert decay_of[id(named["stages.0.1.weight"])] == 0.0           # BN
    assert decay_of[id(named["heads.0.conv.0.weight"])] == wd        # a head's conv kernel
    assert decay_of[id(named["heads.0.conv.1.bias"])] == 0.0         # a head's BN
    assert decay_of[id(named["heads.0.linear.weight"])] == pytest.approx(wd * 0.25)
    assert decay_of[id(named["heads.0.linear.bias"])] == pytest.approx(wd * 0.25)
    assert decay_of[id(named["heads.1.linear.weight"])] == pytest.approx(wd * 1.0)

    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    ref = _conv_head_network()
    ref.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    sum(F.cross_entropy(z, y) for z in net(x)).backward()
    opt.step()
    # the original: cost + sum_k s_k wd (l2(W_k) + l2(b_k)) + wd sum l2(conv W), l2 = sum x^2 / 2
    rn = dict(ref.named_parameters())
    wd_cost = sum(s[k] * wd * (rn[f"heads.{k}.linear.weight"].pow(2).sum() / 2
                                + rn[f"heads.{k}.linear.bias"].pow(2).sum() / 2) for k in range(2))
    wd_cost = wd_cost + wd * sum(m.weight.pow(2).sum() / 2 for m in ref.modules() if isinstance(m, nn.Conv2d))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    (sum(F.cross_entropy(z, y) for z in ref(x)) + wd_cost).backward()
    ref_opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p, rn[name], rtol=1e-5, atol=1e-7, msg=name)


def test_weight_decay_all_mode_and_errors():
    net = _conv_head_network()
    groups = weight_decay_groups(net, 5e-4)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert len(groups[0]["params"]) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="weight_decay_mode: expected one of"):
        weight_decay_groups(net, 5e-4, "bn")
    with pytest.raises(ValueError, match="exit_weights: expected 2 static weights"):
        weight_decay_groups(net, 5e-4, "reference", torch.ones(3))


def test_scheme_decay_weights():
    assert torch.equal(AnytimeLoss(6, "adaloss").weighting.decay_weights(), sieve_weights(6))
    assert torch.equal(AnytimeLoss(6, "const").weighting.decay_weights(), torch.ones(6))
    assert torch.equal(AnytimeLoss(6, "opt").weighting.decay_weights(), torch.eye(6)[-1])
    assert torch.equal(AnytimeLoss(6, "oscillating").weighting.decay_weights(), sieve_weights(6))


# --- exit costs -----------------------------------------------------------------------------

def _flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("builder", ["conv_heads", "msdnet"])
def test_exit_flops_count_every_head_on_the_way(builder):
    """exit_flops[k] == FlopCounterMode over running stages 0..k AND heads 0..k (an anytime
    run), on networks whose heads are convolutional."""
    net = _conv_head_network() if builder == "conv_heads" else msdnet(7, 1, 16, growth=2, base_channels=2,
                                                                      head_channels=4)
    net.eval()
    x = torch.randn(2, 1, 16, 16) if builder == "msdnet" else torch.randn(2, 1, 6, 6)
    costs = net.exit_flops(x)

    def run_to(k):
        h = x
        for j in range(k + 1):
            h = net.forward_stage(j, h)
            net.forward_head(j, h)

    with torch.no_grad():
        expected = [_flops_of(lambda k=k: run_to(k)) / x.shape[0] for k in range(net.num_exits)]
    assert costs.tolist() == expected
    head = net.head_flops(x)
    assert (head > 0).all()  # the heads have convolutions: leaving them out would matter
    assert costs[-1] > net.stage_flops(x).sum()


# --- gradient equilibrium -------------------------------------------------------------------

class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.w, None


def test_gradient_equilibrium_rescales_only_the_coarsest_scale_as_imta():
    torch.manual_seed(0)
    net = msdnet(5, 1, 16, num_exits=3, growth=2, base_channels=2, head_channels=4).double()
    ref = msdnet(5, 1, 16, num_exits=3, growth=2, base_channels=2, head_channels=4).double()
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (3,))
    # IMTA's MSDNet.forward (msdnet_ge.py)
    n, h, preds = ref.num_exits, x, []
    for i in range(n):
        h = list(ref.forward_stage(i, h))
        h[-1] = _Rescale.apply(h[-1], 1.0 / (n - i))
        preds.append(ref.forward_head(i, tuple(h)))
        h[-1] = _Rescale.apply(h[-1], float(n - i - 1))
        h = tuple(h)
    sum(F.cross_entropy(p, y) for p in preds).backward()
    enable_gradient_equilibrium(net)
    sum(F.cross_entropy(p, y) for p in net(x)).backward()
    rn = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, rn[name].grad, rtol=1e-9, atol=1e-12, msg=name)
