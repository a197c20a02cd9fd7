"""L2W-DEN: the sample-weighted fused loss, the weights' means, the early-exit-mimicking
assignment, the SGD look-ahead, the meta-gradient (finite differences, float64), the
checkpoint round trip, Trainer / CLI integration and option errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann_kernels.losses import L2W, AnytimeLoss
from ann_kernels.losses.l2w import (
    center_weights, early_exit_assignment, early_exit_fractions, per_sample_cross_entropy,
    sample_weighted_cross_entropy, sgd_lookahead,
)
from ann_kernels.train import TrainConfig, Trainer, load_splits, seed_everything
from tests.utils import make_logits, make_target, max_abs_err, requires_ext, tiny_mlp_exit_net


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the sample-weighted fused loss -------------------------------------------------------

@requires_ext
@pytest.mark.parametrize("label_smoothing,ignore_frac", [(0.0, 0.0), (0.1, 0.3)])
def test_weighted_fused_loss_matches_torch_reference(label_smoothing, ignore_frac):
    k, n, c = 4, 9, 7
    heads = make_logits(k, n, c)
    target = make_target(n, c, ignore_frac=ignore_frac)
    w = (torch.rand(k, n, generator=torch.Generator().manual_seed(5)) * 2).requires_grad_(True)
    out, w_used = sample_weighted_cross_entropy(heads, target, w, label_smoothing=label_smoothing)
    assert w_used is w
    ref_heads = [z.detach().clone().requires_grad_(True) for z in heads]
    w_ref = w.detach().clone().requires_grad_(True)
    per_sample = per_sample_cross_entropy(ref_heads, target, label_smoothing=label_smoothing)
    n_valid = (target != -100).sum().clamp(min=1)
    ref = (w_ref * per_sample).sum() / n_valid
    assert max_abs_err(out.loss, ref) < 1e-5
    assert max_abs_err(out.per_sample, per_sample) < 1e-5
    assert max_abs_err(out.per_exit, per_sample.sum(1) / n_valid) < 1e-5
    g_out = torch.autograd.grad(3.0 * out.loss, heads + [w])
    g_ref = torch.autograd.grad(3.0 * ref, ref_heads + [w_ref])
    for a, b in zip(g_out, g_ref):
        assert max_abs_err(a, b) < 1e-5
    assert max(a.abs().max().item() for a in g_out) > 1e-3  # not vacuous


@requires_ext
def test_weighted_fused_loss_weight_function_sees_the_ops_outputs():
    heads, target = make_logits(3, 5, 4), make_target(5, 4)
    seen = {}

    def weight_fn(per_sample, confidence, valid):
        seen.update(per_sample=per_sample, confidence=confidence, valid=valid)
        return 1.0 + per_sample  # harder samples weigh more
    out, w = sample_weighted_cross_entropy(heads, target, weight_fn)
    probs = torch.stack([z.detach().softmax(-1) for z in heads])
    assert torch.allclose(seen["confidence"], probs.amax(-1), atol=1e-6)
    assert torch.allclose(w, 1.0 + out.per_sample)
    ref = ((1.0 + out.per_sample) * per_sample_cross_entropy(heads, target)).sum() / 5
    assert max_abs_err(out.loss, ref) < 1e-5
    with pytest.raises(ValueError, match=r"weights: expected sample weights of shape \(3, 5\)"):
        sample_weighted_cross_entropy(heads, target, torch.ones(5, 3))


# --- weights: documented means ------------------------------------------------------------

@pytest.mark.parametrize("mean_over", ["sample", "exit", "all"])
@pytest.mark.parametrize("inputs", ["loss", "confidence", "both"])
def test_weights_have_the_documented_mean(mean_over, inputs):
    torch.manual_seed(0)
    k, n = 5, 16
    scheme = L2W(k, eps=0.5, mean_over=mean_over, inputs=inputs, hidden=32)
    assert scheme.net.fc1.in_features == (2 * k if inputs == "both" else k)
    per_sample, confidence = 3 * torch.rand(k, n), torch.rand(k, n)
    valid = torch.ones(n, dtype=torch.bool)
    valid[[2, 7]] = False
    w = scheme.sample_weights(per_sample, confidence, valid).detach()
    assert w.shape == (k, n)
    m = valid.float()
    if mean_over == "sample":
        assert torch.allclose(w.mean(0), torch.ones(n), atol=1e-6)
    elif mean_over == "exit":
        assert torch.allclose((w * m).sum(1) / m.sum(), torch.ones(k), atol=1e-6)
    else:
        assert abs(float((w * m).sum() / (m.sum() * k)) - 1.0) < 1e-6
    assert (w > 0).all() and (w < 2).all() and w.std() > 1e-4  # eps = 0.5: W in (0, 2), not constant


def test_center_weights_formula():
    g = torch.tensor([[0.5, -0.5], [0.1, 0.3]])
    assert torch.allclose(center_weights(g, 0.2, "sample"), 1 + 0.2 * (g - g.mean(0, keepdim=True)))
    assert torch.allclose(center_weights(g, 0.2, "exit"), 1 + 0.2 * (g - g.mean(1, keepdim=True)))
    assert torch.allclose(center_weights(g, 0.2, "all"), 1 + 0.2 * (g - g.mean()))


# --- early-exit-mimicking assignment ------------------------------------------------------

def test_early_exit_assignment_hand_worked():
    # q proportional to 0.5^k, k = 1..3: [4/7, 2/7, 1/7]; n = 6 -> floor(24/7) = 3 leave at
    # exit 0, floor(12/7) = 1 at exit 1, the last exit takes the remaining 2.
    q = early_exit_fractions(3, 0.5)
    assert torch.allclose(q, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))
    conf = torch.tensor([
        [0.90, 0.20, 0.80, 0.70, 0.10, 0.95],  # exit 0: the top 3 are samples 5, 0, 2
        [0.99, 0.30, 0.99, 0.60, 0.40, 0.99],  # exit 1: of 1, 3, 4 the most confident is 3
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00],
    ])
    assert early_exit_assignment(conf, q).tolist() == [0, 2, 0, 1, 2, 0]
    # Ties go to the lower index; a count of 0 sends nobody.
    tie = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [0.0] * 4])
    assert early_exit_assignment(tie, torch.tensor([0.5, 0.0, 0.5])).tolist() == [0, 0, 2, 2]
    # Default ratio 0.75 for K = 4: q_k = 0.75^k / sum.
    r = torch.tensor([0.75 ** i for i in range(1, 5)], dtype=torch.float64)
    assert torch.allclose(early_exit_fractions(4), r / r.sum())


# --- the SGD look-ahead -------------------------------------------------------------------

@pytest.mark.parametrize("nesterov,dampening", [(True, 0.0), (False, 0.3)])
def test_sgd_lookahead_is_the_real_optimiser_step(nesterov, dampening):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.0 if dampening else 0.9, nesterov=nesterov,
                          dampening=dampening, weight_decay=0.01)
    if dampening:
        opt.param_groups[0]["momentum"] = 0.8  # momentum with dampening (nesterov=False)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    for step in range(3):  # step 0 has no momentum buffers yet, later steps do
        params = dict(model.named_parameters())
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        predicted = sgd_lookahead(params, grads, opt)
        for p, g in zip(params.values(), grads):
            p.grad = g
        opt.step()
        for name, p in model.named_parameters():
            assert torch.allclose(predicted[name], p, atol=1e-14, rtol=0), (step, name)


# --- the meta-gradient --------------------------------------------------------------------

def _tiny_problem(inputs="loss", mean_over="sample"):
    torch.manual_seed(0)
    model = tiny_mlp_exit_net(in_features=6, hidden=5, num_exits=3, num_classes=4, batch_norm=True).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    # One real step so that the optimiser has momentum buffers to reuse.
    F.cross_entropy(model(x)[-1], y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    scheme = L2W(3, eps=0.5, hidden=6, inputs=inputs, mean_over=mean_over).double()
    return model, opt, x, y, scheme


@pytest.mark.parametrize("inputs,mean_over", [("loss", "sample"), ("both", "exit")])
def test_meta_gradient_matches_finite_differences(inputs, mean_over):
    model, opt, x, y, scheme = _tiny_problem(inputs, mean_over)
    before = copy.deepcopy(model.state_dict())
    params = list(scheme.net.parameters())
    meta = scheme.meta_loss(model, opt, x, y)
    analytic = torch.autograd.grad(meta, params)
    # The look-ahead touches neither the model's parameters, nor its buffers, nor .grad.
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    h = 1e-6
    numeric = []
    with torch.no_grad():
        for p in params:
            g = torch.zeros_like(p)
            for idx in range(p.numel()):
                flat = p.view(-1)
                orig = flat[idx].item()
                flat[idx] = orig + h
                with torch.enable_grad():
                    up = scheme.meta_loss(model, opt, x, y).item()
                flat[idx] = orig - h
                with torch.enable_grad():
                    down = scheme.meta_loss(model, opt, x, y).item()
                flat[idx] = orig
                g.view(-1)[idx] = (up - down) / (2 * h)
            numeric.append(g)
    a, b = torch.cat([t.flatten() for t in analytic]), torch.cat([t.flatten() for t in numeric])
    assert a.abs().max() > 1e-6  # the meta-gradient is not trivially zero
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-9), (a - b).abs().max()


def test_pre_step_meta_interval_and_adam_step():
    model, opt, x, y, scheme = _tiny_problem()
    scheme.meta_interval = 2
    loss_fn = AnytimeLoss(3, weighting=scheme)
    start = [p.detach().clone() for p in scheme.net.parameters()]
    first = loss_fn.pre_step(model, opt, x, y)
    assert first is not None and torch.isfinite(first)
    moved = [p.detach().clone() for p in scheme.net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, moved))
    assert scheme.last_meta_loss == first
    assert loss_fn.pre_step(model, opt, x, y) is None  # step 1: skipped
    assert all(torch.equal(a, b) for a, b in zip(moved, scheme.net.parameters()))
    assert loss_fn.pre_step(model, opt, x, y) is not None  # step 2: due again
    assert int(scheme.meta_steps_seen) == 3
    assert all(p.grad is None for p in model.parameters())


def test_checkpoint_round_trips_weight_net_and_adam_state():
    model, opt, x, y, scheme = _tiny_problem()
    for _ in range(2):
        scheme.pre_step(model, opt, x, y)
    state = scheme.state_dict()
    other = L2W(3, eps=0.5, hidden=6).double()
    other.load_state_dict(state)
    for a, b in zip(scheme.net.parameters(), other.net.parameters()):
        assert torch.equal(a, b)
    sa, sb = scheme.meta_optimizer.state_dict()["state"], other.meta_optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    scheme.pre_step(model, opt, x, y)
    other.pre_step(model, opt, x, y)  # the same next step, bit for bit
    for a, b in zip(scheme.net.parameters(), other.net.parameters()):
        assert torch.equal(a, b)
    # The saved state is a copy: training on does not change it.
    assert not torch.equal(state["_extra_state"]["meta_optimizer"]["state"][0]["exp_avg"],
                           scheme.meta_optimizer.state_dict()["state"][0]["exp_avg"])


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0.7}, r"eps: expected a value in \(0, 0.5\].*got 0.7"),
    ({"eps": 0}, r"eps: .* got 0"),
    ({"inputs": "logits"}, r"inputs: expected one of .* got 'logits'"),
    ({"mean_over": "batch"}, r"mean_over: expected one of .* got 'batch'"),
    ({"meta_interval": 0}, r"meta_interval: expected a positive integer, got 0"),
    ({"hidden": 2.5}, r"hidden: expected a positive integer, got 2.5"),
    ({"meta_lr": -1.0}, r"meta_lr: expected a positive learning rate, got -1.0"),
    ({"meta_weight_decay": -1}, r"meta_weight_decay: expected >= 0, got -1"),
    ({"exit_ratio": 0}, r"exit_ratio: expected a finite positive number, got 0"),
])
def test_bad_options_raise_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnytimeLoss(3, weighting="l2w", **kwargs)


def test_adamw_and_tiny_batches_raise_clearly():
    model, _, x, y, scheme = _tiny_problem()
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer: L2W's look-ahead reproduces torch.optim.SGD .* got AdamW"):
        scheme.meta_loss(model, adamw, x, y)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="x: L2W's meta step .* needs >= 2 samples, got 1"):
        scheme.meta_loss(model, sgd, x[:1], y[:1])


# --- Trainer and CLI ----------------------------------------------------------------------

def _trainer(data, out_dir, *, resume=False, epochs=2):
    seed_everything(0)
    model = tiny_mlp_exit_net(in_features=784, hidden=16, num_exits=3, num_classes=10, flatten=True)
    loss = AnytimeLoss(3, weighting="l2w", hidden=16)
    cfg = TrainConfig(epochs=epochs, batch_size=40, seed=0, progress=False, lr=0.05)
    return Trainer(model, loss, data.train, val_set=data.val, test_set=data.test, config=cfg, out_dir=out_dir,
                   spec={"weighting": "l2w"}, resume=resume)


def test_trainer_resume_with_l2w_is_bit_exact(tmp_path):
    data = load_splits("synthetic", limit_train=160, limit_eval=40, seed=0)
    straight = _trainer(data, tmp_path / "a")
    straight.fit()
    first = _trainer(data, tmp_path / "b")
    first.fit(until_epoch=1)
    del first
    torch.manual_seed(999)
    resumed = _trainer(data, tmp_path / "b", resume=True)
    assert resumed.epoch == 1
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    wa, wb = straight.loss_fn.weighting, resumed.loss_fn.weighting
    assert int(wa.meta_steps_seen) == int(wb.meta_steps_seen) == 8
    for a, b in zip(wa.net.parameters(), wb.net.parameters()):
        assert torch.equal(a, b)
    sa, sb = wa.meta_optimizer.state_dict()["state"], wb.meta_optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and sa[i]["step"] == sb[i]["step"] for i in sa)
    assert straight.history[-1]["weights"] == resumed.history[-1]["weights"]


def test_cli_trains_l2w(tmp_path):
    from ann_kernels.cli import main

    tiny = ["--dataset", "synthetic", "--model", "mlp", "--num-exits", "3", "--model-arg", "hidden=16",
            "--limit-train", "120", "--limit-eval", "40", "--batch-size", "40", "--no-progress", "--epochs", "1"]
    assert main(["train", *tiny, "--weighting", "l2w", "--weighting-arg", "hidden=8",
                 "--weighting-arg", "meta_interval=2", "--out", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["loss"]["weighting.net.fc1.weight"].shape == (8, 3)
    assert int(ckpt["loss"]["weighting.meta_steps_seen"]) == 3
    assert ckpt["loss"]["weighting._extra_state"]["meta_optimizer"]["state"]  # Adam has stepped
    assert main(["train", *tiny, "--weighting", "l2w", "--optimizer", "adamw", "--out", str(tmp_path / "x")]) == 2

