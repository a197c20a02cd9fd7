"""The baseline training recipes: SDN's schedule, IMTA's one-for-all knowledge distillation
and IMTA's gradient equilibrium (GE), alone and through the Trainer and CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ann_kernels.losses import AnytimeLoss, GradientEquilibrium, IMTADistillation, SDNSchedule
from ann_kernels.losses.baselines import sdn_weights
from ann_kernels.nn import disable_gradient_equilibrium, enable_gradient_equilibrium
from ann_kernels.train import TrainConfig, Trainer, load_splits, seed_everything
from tests.utils import make_logits, make_target, max_abs_err, tiny_cli_args, tiny_mlp_exit_net


pytestmark = pytest.mark.usefixtures("one_thread")


# --- SDN ----------------------------------------------------------------------------------

def test_sdn_schedule_rises_linearly_to_the_caps():
    s = SDNSchedule(4)  # caps: relative depth 0.25, 0.5, 0.75 (the last exit: 1)
    assert torch.allclose(s.weights_for_step(), torch.tensor([0.01, 0.01, 0.01, 1.0]))
    s.set_epoch(2, 10)
    assert torch.allclose(s.weights_for_step(), torch.tensor([0.01 + 0.05, 0.01 + 0.1, 0.01 + 0.15, 1.0]))
    s.set_epoch(10, 10)  # at (and past) the end: the caps
    assert torch.allclose(s.weights_for_step(), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    custom = SDNSchedule(3, caps=[0.3, 0.6], start=0.0)
    custom.set_epoch(1, 2)
    assert torch.allclose(custom.weights_for_step(), torch.tensor([0.15, 0.3, 1.0]))
    assert torch.allclose(sdn_weights(torch.tensor([0.5, 1.0]), 1, 4, 0.01), torch.tensor([0.135, 1.0]))


def test_trainer_feeds_the_epoch_to_sdn():
    data = load_splits("synthetic", limit_train=80, limit_eval=40, seed=0)
    seed_everything(0)
    model = tiny_mlp_exit_net(in_features=784, hidden=8, num_exits=3, num_classes=10, flatten=True)
    trainer = Trainer(model, AnytimeLoss(3, weighting="sdn"), data.train, config=TrainConfig(
        epochs=2, batch_size=40, progress=False))
    history = trainer.fit()
    caps = torch.tensor([1 / 3, 2 / 3, 1.0])
    assert history[0]["weights"] == pytest.approx(sdn_weights(caps, 0, 2).tolist())
    assert history[1]["weights"] == pytest.approx(sdn_weights(caps, 1, 2).tolist())


# --- IMTA knowledge distillation ----------------------------------------------------------

def test_imta_kd_defaults_are_run_imta_sh():
    kd = IMTADistillation(3)
    assert (kd.temperature, kd.alpha, kd.reduction) == (1.0, 0.1, "mean")


@pytest.mark.parametrize("ignore_frac,temperature,alpha,reduction",
                         [(0.0, 3.0, 0.5, "batchmean"), (0.3, 1.5, 0.8, "batchmean"), (0.0, 1.0, 0.1, "mean"),
                          (0.3, 3.0, 0.9, "mean")])
def test_imta_kd_matches_reference(ignore_frac, temperature, alpha, reduction):
    k, n, c = 4, 11, 6
    heads = make_logits(k, n, c)
    target = make_target(n, c, ignore_frac=ignore_frac)
    base = torch.tensor([0.5, 1.0, 1.5, 2.0])
    loss = AnytimeLoss(k, weighting="imta_kd", temperature=temperature, alpha=alpha, base=base,
                       reduction=reduction)(heads, target)
    ref_heads = [z.detach().clone().requires_grad_(True) for z in heads]
    valid = target != -100
    teacher = F.softmax(ref_heads[-1].detach() / temperature, dim=-1)
    ref = base[-1] * F.cross_entropy(ref_heads[-1], target)
    # IMTA's KDLoss: nn.KLDivLoss() (default reduction "mean": over N x C elements, 1/C of batchmean)
    kl_fn = torch.nn.KLDivLoss() if reduction == "mean" else torch.nn.KLDivLoss(reduction="batchmean")
    for j in range(k - 1):
        kl = kl_fn(F.log_softmax(ref_heads[j][valid] / temperature, -1), teacher[valid])
        ref = ref + base[j] * ((1 - alpha) * F.cross_entropy(ref_heads[j], target)
                               + alpha * temperature ** 2 * kl)
    assert max_abs_err(loss, ref) < 1e-5
    for a, b in zip(torch.autograd.grad(loss, heads), torch.autograd.grad(ref, ref_heads)):
        assert max_abs_err(a, b) < 1e-5
    # The teacher is detached: the last exit's gradient is its own CE's only.
    fresh = AnytimeLoss(k, weighting="imta_kd", temperature=temperature, alpha=alpha, base=base,
                        reduction=reduction)(heads, target)
    only_ce = torch.autograd.grad(base[-1] * F.cross_entropy(ref_heads[-1], target), ref_heads[-1])[0]
    assert max_abs_err(torch.autograd.grad(fresh, heads[-1])[0], only_ce) < 1e-5


# --- gradient equilibrium -----------------------------------------------------------------

def test_gradient_equilibrium_averages_downstream_gradients():
    """With GE, stage k's parameters get the mean over heads j >= k of the per-head
    gradients (IMTA's equilibrium); heads get their own gradient; values are unchanged."""
    torch.manual_seed(0)
    k = 4
    net = tiny_mlp_exit_net(in_features=5, hidden=6, num_exits=k, num_classes=3).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    plain = net(x)
    per_head = [torch.autograd.grad(F.cross_entropy(plain[j], y), list(net.parameters()), allow_unused=True,
                                    retain_graph=True) for j in range(k)]
    keys_before = list(net.state_dict())
    enable_gradient_equilibrium(net)
    enable_gradient_equilibrium(net)  # idempotent
    assert list(net.state_dict()) == keys_before
    out = net(x)
    assert all(torch.equal(a, b) for a, b in zip(out, plain))
    total = sum(F.cross_entropy(z, y) for z in out)
    ge = torch.autograd.grad(total, list(net.parameters()), allow_unused=True)
    names = [n for n, _ in net.named_parameters()]
    for i, name in enumerate(names):
        idx = int(name.split(".")[1])
        if name.startswith("stages."):
            expected = sum(per_head[j][i] for j in range(idx, k)) / (k - idx)
        else:
            expected = per_head[idx][i]
        assert torch.allclose(ge[i], expected, atol=1e-12), name
    disable_gradient_equilibrium(net)
    again = torch.autograd.grad(sum(F.cross_entropy(z, y) for z in net(x)), list(net.parameters()))
    assert torch.allclose(again[0], sum(per_head[j][0] for j in range(k)), atol=1e-12)


def test_ge_weighting_and_config_enable_the_hooks():
    data = load_splits("synthetic", limit_train=80, limit_eval=40, seed=0)
    for weighting, flag in (("ge", False), ("adaloss", True), ("const", False)):
        seed_everything(0)
        model = tiny_mlp_exit_net(in_features=784, hidden=8, num_exits=3, num_classes=10, flatten=True)
        trainer = Trainer(model, AnytimeLoss(3, weighting=weighting), data.train,
                          config=TrainConfig(epochs=1, batch_size=40, progress=False, gradient_equilibrium=flag))
        assert bool(getattr(model, "_gradient_equilibrium_handles", None)) == (weighting == "ge" or flag)
        assert torch.isfinite(torch.tensor(trainer.fit()[-1]["train_loss"]))
    assert isinstance(AnytimeLoss(3, weighting="ge").weighting, GradientEquilibrium)


def test_cli_trains_the_baselines(tmp_path):
    from ann_kernels.cli import main

    tiny = tiny_cli_args(limit_train=80)
    assert main(["train", *tiny, "--weighting", "imta_kd", "--weighting-arg", "temperature=2",
                 "--out", str(tmp_path / "kd")]) == 0
    assert main(["train", *tiny, "--weighting", "sdn", "--gradient-equilibrium", "--out", str(tmp_path / "c")]) == 0
    ckpt = torch.load(tmp_path / "c" / "last.pt", weights_only=False)
    assert ckpt["config"]["gradient_equilibrium"] is True and ckpt["spec"]["weighting"] == "sdn"
    assert torch.allclose(ckpt["loss"]["weighting.current"], torch.tensor([0.01, 0.01, 1.0]))


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: SDNSchedule(4, caps=[0.5, 0.5]), r"caps: expected 3 non-negative internal-exit caps"),
    (lambda: SDNSchedule(3, start=2), r"start: expected a weight in \[0, 1\], got 2"),
    (lambda: IMTADistillation(3, temperature=0), r"temperature: expected a positive number, got 0"),
    (lambda: IMTADistillation(3, alpha=1.5), r"alpha: expected a value in \[0, 1\], got 1.5"),
    (lambda: IMTADistillation(3, reduction="sum"), r"reduction: expected one of \('mean', 'batchmean'\), got 'sum'"),
    (lambda: AnytimeLoss(3, weighting="imta_kd", tau=2), r"weighting 'imta_kd': .*tau"),
])
def test_bad_options_raise_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gradient_equilibrium_needs_a_multi_exit_network():
    with pytest.raises(TypeError, match="model: gradient equilibrium needs a MultiExitNetwork"):
        enable_gradient_equilibrium(torch.nn.Linear(2, 2))
