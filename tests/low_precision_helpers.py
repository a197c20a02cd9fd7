"""Checks of the logits op's fp16 gradient buffer (issue 20), shared by the C++ / CUDA tests
(tests/test_multi_exit_ce_training.py) and the Triton-interpreter tests
(tests/test_triton_multi_exit_ce_op.py).

The buffer holds fp16(2^m g_pre), g_pre = w_k s_ik / N_valid (p - t), with 2^m chosen per
call so that the largest possible entry lands just below 2^15; backward multiplies it by
grad_out 2^-m in fp32 and rounds to fp16 again (docs/low_precision.md). Every case is held
to the two-rounding bound entry by entry, against a float64 truth:

    |ours - G| <= (2u + u^2 + 1e-5) |G| + 2^-23 + 2^-22 |grad_out| w_k |s_ik| / N_valid,

u = 2^-11 (fp16's unit roundoff); 2^-23 covers the two roundings at fp16's subnormal spacing
2^-24 (half a spacing each, the stored one scaled by |grad_out 2^-m| <= 2); the last term is
the fp32 cancellation at the target entry (p - 1). Where torch's own fp16 error is defined
(no sample weights), also within 2x torch's error (tests/utils.py: low_precision_bound).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ann_kernels
from tests.utils import FP16_UNIT, low_precision_bound, torch_own_grads

FP16_SUBNORMAL = 2.0 ** -24  # fp16's smallest subnormal (its absolute resolution)


def fp64_truth(heads, target, weights, grad_out, *, sample_weights=None, label_smoothing=0.0):
    """float64 gradients of grad_out * sum_k w_k sum_i s_ik l_ik / N_valid (on CPU)."""
    leaves = [z.detach().cpu().double().requires_grad_() for z in heads]
    target = target.cpu()
    n_valid = (target != -100).sum().clamp(min=1).double()
    s = None if sample_weights is None else sample_weights.cpu().double()
    loss = 0
    for k, z in enumerate(leaves):
        per_row = F.cross_entropy(z, target, label_smoothing=label_smoothing, reduction="none")
        if s is not None:
            per_row = per_row * (s if s.dim() == 1 else s[k])
        loss = loss + weights[k].item() * per_row.sum() / n_valid
    return list(torch.autograd.grad(loss * grad_out, leaves))


def assert_fp16_two_roundings(ours, truth, target, weights, grad_out, *, sample_weights=None):
    """The entry-by-entry bound of the module docstring, per exit."""
    n_valid = int((target != -100).sum())
    for k, (g, r) in enumerate(zip(ours, truth)):
        assert g.dtype == torch.float16 and bool(torch.isfinite(g).all()), f"exit {k}: inf/NaN in the gradient"
        s = torch.ones(r.shape[0], dtype=torch.float64) if sample_weights is None else sample_weights.cpu().double()
        s = s if s.dim() == 1 else s[k]
        row_scale = (abs(grad_out) * weights[k].item() / n_valid * s.abs())[:, None]
        limit = (2 * FP16_UNIT + FP16_UNIT ** 2 + 1e-5) * r.abs() + 2.0 ** -23 + row_scale * 2.0 ** -22
        excess = (g.cpu().double() - r).abs() / limit
        assert bool((excess <= 1).all()), f"exit {k}: error up to {float(excess.max()):.3g}x the two-rounding bound"


def check_fp16_case(heads, target, weights, grad_out, *, sample_weights=None, label_smoothing=0.05, vs_torch=True):
    """Run the op on fp16 ``heads``, check the bound(s); returns (ours, truth)."""
    leaves = [z.detach().clone().requires_grad_() for z in heads]
    out = ann_kernels.multi_exit_cross_entropy(leaves, target, weights, label_smoothing=label_smoothing,
                                               sample_weights=sample_weights)
    ours = torch.autograd.grad(out.loss, leaves, torch.tensor(grad_out, device=target.device))
    truth = fp64_truth(heads, target, weights, grad_out, sample_weights=sample_weights,
                       label_smoothing=label_smoothing)
    assert_fp16_two_roundings(ours, truth, target, weights, grad_out, sample_weights=sample_weights)
    if vs_torch:
        theirs = torch_own_grads(heads, target, weights, grad_out, label_smoothing=label_smoothing)
        for g, t, r in zip(ours, theirs, truth):
            err, bound = low_precision_bound(g.cpu(), t, r, floor=2.0 ** -23)
            assert err <= bound, (err, bound)
    return ours, truth


def _heads(n, c, device, *, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, c, generator=gen)).to(device=device, dtype=torch.float16) for _ in range(3)]


def _target(n, c, device, *, seed):
    target = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    target[::7] = -100
    return target.to(device)


def check_fp16_grad_scaler_scales(device, *, n=48, c=300):
    """GradScaler's 2^16 and a 2^24 scale (weights small enough that the true gradient fits
    fp16, as it must for any fp16 result): no inf/NaN, two-rounding bound, 2x torch; [K, N]
    sample weights with a negative entry (they enter the choice of 2^m) at 2^16."""
    heads, target = _heads(n, c, device, seed=1), _target(n, c, device, seed=2)
    weights = torch.tensor([0.3, 1.0, 2.0], device=device)
    check_fp16_case(heads, target, weights, 2.0 ** 16)
    check_fp16_case(heads, target, weights * 2.0 ** -8, 2.0 ** 24)
    s = torch.rand(3, n, generator=torch.Generator().manual_seed(3)).add_(0.25)
    s[1, 2] = -1.5
    check_fp16_case(heads, target, weights, 2.0 ** 16, sample_weights=s.to(device), vs_torch=False)


def check_fp16_tiny_grad_out(device, *, n=48, c=300):
    """grad_out = 2^-20: no entry flushed to zero where torch's own autocast-style gradient
    (fp32 softmax times grad_out, rounded once to fp16) keeps it, and the bounds hold."""
    heads, target = _heads(n, c, device, seed=4), _target(n, c, device, seed=5)
    weights = torch.tensor([0.3, 1.0, 2.0], device=device)
    grad_out = 2.0 ** -20
    ours, truth = check_fp16_case(heads, target, weights, grad_out)
    leaves = [z.detach().clone().requires_grad_() for z in heads]
    loss = sum(wk * F.cross_entropy(z.float(), target, label_smoothing=0.05) for wk, z in zip(weights.tolist(), leaves))
    autocast = torch.autograd.grad(loss * grad_out, leaves)
    kept = 0
    for g, a, r in zip(ours, autocast, truth):
        # a tie at half the smallest subnormal may round either way: left out
        flushed = (g.cpu() == 0) & (a.cpu() != 0) & (r.abs() > 0.51 * FP16_SUBNORMAL)
        assert not bool(flushed.any()), f"{int(flushed.sum())} entries flushed to zero that torch keeps"
        kept += int((a != 0).sum())
    assert kept > 0  # the case has entries that survive at this scale


def check_fp16_extreme_logits(device, *, c=300):
    """Logits of +-1e4 in fp16: a row with one dominating logit at the target and one at a
    non-target class, a row of random +-1e4, a row with one -1e4; grad_out 1 and 2^16."""
    n = 8
    heads = _heads(n, c, device, seed=6)
    target = torch.tensor([0, 1, 2, 3, 4, -100, 6, 7], device=device)
    gen = torch.Generator().manual_seed(7)
    for z in heads:
        z[0, 0] = 1e4  # dominating, at the target: p = 1 there, every entry of the row ~0
        z[1, 2] = 1e4  # dominating elsewhere: the target's entry ~ -1
        z[2] = torch.where(torch.rand(c, generator=gen) < 0.5, -1e4, 1e4).to(device=device, dtype=torch.float16)
        z[3, 5] = -1e4
    weights = torch.tensor([0.3, 1.0, 2.0], device=device)
    for grad_out in (1.0, 2.0 ** 16):
        check_fp16_case(heads, target, weights, grad_out)


def check_fp16_legacy_entry(device, *, n=48, c=300):
    """The older entry ``multi_exit_ce_fwd`` returns the gradient for grad_out = 1, which its
    caller multiplies by its own grad_out and rounds to fp16. For fp16 logits it comes in
    fp32 (from the 2^m-scaled buffer, exactly), so for grad_out in {1, 2^16, 1/8, -3} that
    result keeps the two-rounding bound entry by entry and 2x torch's error against float64.
    An fp16 gradient (what the entry returned before) has flushed the entries below 2^-24
    that GradScaler's 2^16 brings back into range."""
    heads, target = _heads(n, c, device, seed=8), _target(n, c, device, seed=9)
    weights = torch.tensor([0.3, 1.0, 2.0], device=device)
    out = torch.ops.ann_kernels.multi_exit_ce_fwd(heads, target, weights, -100, 0.05, None, 0.9, True)
    grads = out[5]
    for grad_out in (1.0, 2.0 ** 16, 0.125, -3.0):
        ours = [(g * grad_out).to(torch.float16) for g in grads.unbind(0)]
        truth = fp64_truth(heads, target, weights, grad_out, label_smoothing=0.05)
        assert_fp16_two_roundings(ours, truth, target, weights, grad_out)
        theirs = torch_own_grads(heads, target, weights, grad_out, label_smoothing=0.05)
        for g, t, r in zip(ours, theirs, truth):
            err, bound = low_precision_bound(g.cpu(), t, r, floor=2.0 ** -23)
            assert err <= bound, (grad_out, err, bound)
    assert grads.dtype == torch.float32 and grads.shape == (3, n, c)
