"""L2W-DEN: the sample-weighted fused loss, the weights' means, the early-exit-mimicking
assignment, the meta loss (hand-worked), the SGD look-ahead, the meta-gradient (finite
differences, float64), the two-phase iteration and the meta LR schedule against a
plain-torch transcription of LeapLabTHU/L2W-DEN's ``train()``, the checkpoint round trip,
Trainer / CLI integration and option errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann_kernels.losses import L2W, AnytimeLoss
from ann_kernels.losses.l2w import (
    L2W_RECIPE, center_weights, early_exit_assignment, early_exit_fractions, early_exit_meta_loss,
    per_sample_cross_entropy, sample_weighted_cross_entropy, sgd_lookahead, split_halves,
)
from ann_kernels.train import TrainConfig, Trainer, load_splits, seed_everything
from tests.utils import make_logits, make_target, max_abs_err, requires_ext, tiny_cli_args, tiny_mlp_exit_net


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the sample-weighted fused loss -------------------------------------------------------

@requires_ext
@pytest.mark.parametrize("label_smoothing,ignore_frac,w_low", [(0.0, 0.0, 0.0), (0.1, 0.3, 0.0), (0.0, 0.2, -0.6)])
def test_weighted_fused_loss_matches_torch_reference(label_smoothing, ignore_frac, w_low):
    # w_low < 0: eps = 0.8 gives W in (1 - 2 eps, 1 + 2 eps), negative weights included.
    k, n, c = 4, 9, 7
    heads = make_logits(k, n, c)
    target = make_target(n, c, ignore_frac=ignore_frac)
    w = (w_low + torch.rand(k, n, generator=torch.Generator().manual_seed(5)) * 2).requires_grad_(True)
    assert (w_low == 0.0) or bool((w < 0).any())
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


# --- the meta loss: the sum over exits of each group's mean ------------------------------

def test_meta_loss_hand_worked_two_exits_groups_of_different_sizes():
    # K = 2, ratio 1.5: q = [1/2.5, 1.5/2.5] = [0.4, 0.6]; n = 5 -> floor(2) = 2 samples leave
    # at exit 0 (the two most confident there: 0 and 2), the last exit takes 1, 3, 4.
    probs = torch.tensor([
        [[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.5, 0.5], [0.7, 0.3]],    # exit 0
        [[0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.75, 0.25], [0.4, 0.6]],  # exit 1
    ], dtype=torch.float64)
    target = torch.tensor([0, 1, 0, 0, 1])
    logits = probs.log()  # CE of a row = -log p_target
    q = early_exit_fractions(2, 1.5)
    assert torch.allclose(q, torch.tensor([0.4, 0.6], dtype=torch.float64))
    exit_of = early_exit_assignment(logits.softmax(-1).amax(-1), q)
    assert exit_of.tolist() == [0, 1, 0, 1, 1]
    group0 = -(math.log(0.9) + math.log(0.8)) / 2             # exit 0's 2 samples
    group1 = -(math.log(0.8) + math.log(0.75) + math.log(0.6)) / 3  # exit 1's 3 samples
    got = early_exit_meta_loss(logits, target, exit_of)
    assert abs(got.item() - (group0 + group1)) < 1e-12
    # Not one mean over all 5 samples (what a pooled cross-entropy would give).
    pooled = -(math.log(0.9) + math.log(0.8) + math.log(0.8) + math.log(0.75) + math.log(0.6)) / 5
    assert abs(got.item() - pooled) > 0.2
    # An empty group adds nothing.
    assert abs(early_exit_meta_loss(logits, target, torch.ones(5, dtype=torch.int64)).item()
               - (-(math.log(0.3) + math.log(0.8) + math.log(0.1) + math.log(0.75) + math.log(0.6)) / 5)) < 1e-12


def test_split_halves_is_chunk_and_phases_run_a_b_then_b_a():
    x, y = torch.arange(7.0).unsqueeze(1), torch.arange(7)
    (xa, ya), (xb, yb) = split_halves(x, y)
    assert ya.tolist() == [0, 1, 2, 3] and yb.tolist() == [4, 5, 6]  # torch.chunk(2): A gets ceil(7/2)
    scheme = L2W(3, hidden=4)
    phases = scheme.phases(x, y)
    assert [(t[1].tolist(), m[1].tolist()) for t, m in phases] == [([0, 1, 2, 3], [4, 5, 6]),
                                                                    ([4, 5, 6], [0, 1, 2, 3])]
    assert int(scheme.batches_seen) == 1
    with pytest.raises(ValueError, match="x: L2W's meta step splits the batch in two halves, needs >= 2 samples"):
        scheme.phases(x[:1], y[:1])


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

def _tiny_problem(inputs="loss", mean_over="all"):
    torch.manual_seed(0)
    model = tiny_mlp_exit_net(in_features=6, hidden=5, num_exits=3, num_classes=4, batch_norm=True).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    # One real step so that the optimiser has momentum buffers to reuse.
    F.cross_entropy(model(x)[-1], y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    scheme = L2W(3, eps=0.8, hidden=6, inputs=inputs, mean_over=mean_over).double()
    return model, opt, x, y, scheme


@pytest.mark.parametrize("inputs,mean_over", [("loss", "all"), ("both", "exit")])
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
    assert loss_fn.pre_step(model, opt, x, y) is None  # iteration 1: skipped
    assert all(torch.equal(a, b) for a, b in zip(moved, scheme.net.parameters()))
    assert loss_fn.pre_step(model, opt, x, y) is not None  # iteration 2: due again
    assert int(scheme.batches_seen) == 3 and int(scheme.meta_steps_seen) == 2
    # With phases, both phases of a due iteration meta-step, none of a skipped one.
    phases = scheme.phases(x, y)  # iteration 3: skipped
    assert all(loss_fn.pre_step(model, opt, *t, meta=m) is None for t, m in phases)
    phases = scheme.phases(x, y)  # iteration 4: due
    assert all(loss_fn.pre_step(model, opt, *t, meta=m) is not None for t, m in phases)
    assert int(scheme.batches_seen) == 5 and int(scheme.meta_steps_seen) == 4
    assert all(p.grad is None for p in model.parameters())


def test_checkpoint_round_trips_weight_net_and_adam_state():
    model, opt, x, y, scheme = _tiny_problem()
    for _ in range(2):
        scheme.pre_step(model, opt, x, y)
    state = scheme.state_dict()
    other = L2W(3, eps=0.8, hidden=6).double()
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
    ({"eps": 1.2}, r"eps: expected a value in \(0, 1\].*got 1.2"),
    ({"eps": 0}, r"eps: .* got 0"),
    ({"inputs": "logits"}, r"inputs: expected one of .* got 'logits'"),
    ({"mean_over": "batch"}, r"mean_over: expected one of .* got 'batch'"),
    ({"meta_lr_schedule": "step"}, r"meta_lr_schedule: expected one of .* got 'step'"),
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
    with pytest.raises(ValueError, match="x: L2W's meta step .* needs >= 2 samples .* got 1 inputs"):
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
    # 4 batches x 2 epochs, two phases (two meta updates) each.
    assert int(wa.batches_seen) == int(wb.batches_seen) == 8
    assert int(wa.meta_steps_seen) == int(wb.meta_steps_seen) == 16
    assert straight.step == resumed.step == 16
    for a, b in zip(wa.net.parameters(), wb.net.parameters()):
        assert torch.equal(a, b)
    sa, sb = wa.meta_optimizer.state_dict()["state"], wb.meta_optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and sa[i]["step"] == sb[i]["step"] for i in sa)
    assert straight.history[-1]["weights"] == resumed.history[-1]["weights"]


def test_cli_trains_l2w(tmp_path):
    from ann_kernels.cli import main

    tiny = tiny_cli_args(limit_train=120)
    assert main(["train", *tiny, "--weighting", "l2w", "--weighting-arg", "hidden=8",
                 "--weighting-arg", "meta_interval=2", "--out", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["loss"]["weighting.net.fc1.weight"].shape == (8, 3)
    # 3 batches, meta updates on iterations 0 and 2, two phases each.
    assert int(ckpt["loss"]["weighting.batches_seen"]) == 3
    assert int(ckpt["loss"]["weighting.meta_steps_seen"]) == 4
    assert ckpt["loss"]["weighting._extra_state"]["meta_optimizer"]["state"]  # Adam has stepped
    assert main(["train", *tiny, "--weighting", "l2w", "--optimizer", "adamw", "--out", str(tmp_path / "x")]) == 2



# --- the two-phase iteration against a plain-torch transcription of the original ---------

def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    """Replace parameter ``dotted`` of ``module`` by a plain (non-leaf) tensor."""
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    del module._parameters[leaf]
    setattr(module, leaf, value)


def _reference_meta_update(model, meta_net, meta_opt, sgd, xt, yt, xm, ym, *, eps, ratio, meta_lr):
    """One meta update as LeapLabTHU/L2W-DEN's ``train()`` does it, transcribed in plain
    torch: a copy of the model, per-sample losses [n, K] on the train half, W = 1 + eps (g -
    mean g) (constraint ``mat``), one SGD step (with the real optimiser's momentum buffers)
    kept differentiable, early-exit groups on the meta half, sum of each group's mean CE,
    Adam at meta_lr."""
    pseudo = copy.deepcopy(model)
    pseudo.train()
    losses = torch.stack([F.cross_entropy(z, yt, reduction="none") for z in pseudo(xt)], dim=1)  # [n, K]
    g = meta_net(losses.detach())
    w = 1 + eps * (g - g.mean())
    inner = (w * losses).mean(0).sum()
    names = [n for n, _ in pseudo.named_parameters()]
    params = [p for _, p in pseudo.named_parameters()]
    grads = torch.autograd.grad(inner, params, create_graph=True)
    group = sgd.param_groups[0]
    for name, p, grad, real in zip(names, params, grads, model.parameters()):
        d = grad + group["weight_decay"] * p.detach()
        buf = sgd.state.get(real, {}).get("momentum_buffer")
        d = d if buf is None else group["momentum"] * buf + d  # dampening 0, no Nesterov
        _set_tensor(pseudo, name, p.detach() - group["lr"] * d)
    outs = pseudo(xm)
    k, n = len(outs), xm.shape[0]
    q = [ratio ** (j + 1) for j in range(k)]
    q = [v / sum(q) for v in q]
    used, meta = set(), 0.0
    for j in range(k):
        order = outs[j].detach().softmax(1).amax(1).argsort(descending=True, stable=True).tolist()
        free = [i for i in order if i not in used]
        chosen = free if j == k - 1 else free[: math.floor(n * q[j] + 1e-9)]
        used.update(chosen)
        if chosen:
            meta = meta + F.cross_entropy(outs[j][chosen], ym[chosen])
    for pg in meta_opt.param_groups:
        pg["lr"] = meta_lr
    meta_opt.zero_grad()
    meta.backward()
    meta_opt.step()


def _reference_model_update(model, meta_net, sgd, x, y, eps):
    outs = model(x)
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in outs], dim=1)
    with torch.no_grad():
        g = meta_net(losses)
        w = 1 + eps * (g - g.mean())
    loss = (w * losses).mean(0).sum()
    sgd.zero_grad()
    loss.backward()
    sgd.step()


def test_trainer_two_phases_match_a_transcription_of_the_original_loop():
    """Which half feeds which step and the order of meta / model updates: the Trainer's
    L2W-DEN run equals the transcription (per batch: meta A->B, model on A, meta B->A, model
    on B; both at the batch's LR; meta LR = meta_lr x the main cosine)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    n, bs, epochs = 27, 9, 1  # 3 batches of 9: halves of 5 and 4
    data = TensorDataset(torch.randn(n, 6), torch.randint(0, 4, (n,)))
    model = tiny_mlp_exit_net(in_features=6, hidden=5, num_exits=3, num_classes=4, batch_norm=True)
    loss_fn = AnytimeLoss(3, weighting="l2w", hidden=7, meta_lr=1e-2)  # a larger meta LR: visible moves
    scheme = loss_fn.weighting
    ref_model, ref_net = copy.deepcopy(model), copy.deepcopy(scheme.net)
    cfg = TrainConfig(epochs=epochs, seed=3, progress=False, **{**L2W_RECIPE, "batch_size": bs})
    trainer = Trainer(model, loss_fn, data, config=cfg)
    net_before = [p.detach().clone() for p in scheme.net.parameters()]
    trainer.fit()
    assert trainer.step == 6 and int(scheme.meta_steps_seen) == 6

    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    meta_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-2, weight_decay=1e-4)
    loader = DataLoader(data, batch_size=bs, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(3))
    total = len(loader) * epochs
    for i, (x, y) in enumerate(loader):
        cos = 0.5 * (1 + math.cos(math.pi * i / total))
        for group in sgd.param_groups:
            group["lr"] = 0.1 * cos
        a, b = (x[:5], y[:5]), (x[5:], y[5:])
        for (xt, yt), (xm, ym) in ((a, b), (b, a)):
            _reference_meta_update(ref_model, ref_net, meta_opt, sgd, xt, yt, xm, ym, eps=0.8, ratio=0.75,
                                   meta_lr=1e-2 * cos)
            _reference_model_update(ref_model, ref_net, sgd, xt, yt, 0.8)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(net_before, scheme.net.parameters()))
    for (name, a), b in zip(scheme.net.named_parameters(), ref_net.parameters()):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-4), (name, (a - b).abs().max())
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=2e-6, rtol=1e-4), (name, (a - b).abs().max())


def test_meta_lr_follows_the_main_cosine():
    model, _, x, y, scheme = _tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    total = 5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    seen = []
    for _ in range(total):
        for train, meta in scheme.phases(x, y):
            scheme.pre_step(model, opt, *train, meta=meta)
            seen.append(scheme.meta_optimizer.param_groups[0]["lr"])
        opt.step()  # no grads: a no-op, keeps the scheduler from warning
        sched.step()
    want = [1e-4 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total) for _ in range(2)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)
    assert seen[0] == 1e-4 and seen[-1] < 1e-5
    constant = L2W(3, hidden=6, meta_lr_schedule="constant").double()
    constant.pre_step(model, opt, x, y)
    assert constant.meta_optimizer.param_groups[0]["lr"] == 1e-4
    # Without a scheduler (no initial_lr) the factor is 1.
    plain = torch.optim.SGD(model.parameters(), lr=0.05)
    scheme.pre_step(model, plain, x, y)
    assert scheme.meta_optimizer.param_groups[0]["lr"] == 1e-4


def test_defaults_are_the_original_recipe():
    scheme = L2W(5)
    assert (scheme.eps, scheme.mean_over, scheme.inputs, scheme.meta_interval, scheme.exit_ratio) == (
        0.8, "all", "loss", 1, 0.75)
    assert scheme.net.fc1.out_features == 500
    group = scheme.meta_optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 1e-4)
    assert L2W_RECIPE == {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                          "weight_decay": 1e-4, "batch_size": 64}
    # eps up to 1: weights may go negative, as the original allows.
    w = L2W(5, eps=1.0, hidden=8).sample_weights(10 * torch.rand(5, 64), torch.rand(5, 64))
    assert abs(w.mean().item() - 1) < 1e-6
