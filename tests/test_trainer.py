"""Trainer on synthetic data: learning, checkpoints that resume bit-for-bit, metrics, plots."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ann_kernels.losses import AnytimeLoss
from ann_kernels.nn import MultiExitNetwork, mlp_ann
from ann_kernels.train import (
    TrainConfig,
    Trainer,
    exit_table,
    load_splits,
    plot_anytime,
    plot_weights,
    read_jsonl,
    seed_everything,
)
from ann_kernels.train.metrics import format_flops, mean_std
from tests.utils import DEVICES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data():
    return load_splits("synthetic", limit_train=240, limit_eval=100, seed=0)


def dropout_net(num_exits: int = 3, hidden: int = 24) -> MultiExitNetwork:
    """A tiny MLP anytime network with dropout, so training consumes the global torch RNG."""
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(0.2))]
    stages += [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.2)) for _ in range(num_exits - 1)]
    heads = [nn.Linear(hidden, 10) for _ in range(num_exits)]
    return MultiExitNetwork(stages, heads, num_classes=10)


def make_trainer(data, out_dir, weighting="adaloss", *, resume=False, model_fn=dropout_net, weighting_kwargs=None,
                 **cfg):
    cfg = {"epochs": 2, "batch_size": 40, "seed": 0, "progress": False, "lr": 0.05, **cfg}
    seed_everything(cfg["seed"])
    model = model_fn()
    if weighting == "adaloss" and weighting_kwargs is None:
        weighting_kwargs = {"update_every": 5}  # a few updates within these short runs (default: 100)
    loss = AnytimeLoss(model.num_exits, weighting=weighting, **(weighting_kwargs or {}))
    return Trainer(model, loss, data.train, val_set=data.val, test_set=data.test, config=TrainConfig(**cfg),
                   out_dir=out_dir, spec={"weighting": weighting}, resume=resume)


def test_trainer_learns_and_writes_everything(tiny_data, tmp_path):
    trainer = make_trainer(tiny_data, tmp_path, epochs=3,
                           model_fn=lambda: mlp_ann(in_features=784, hidden=32, num_exits=3))
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3] and trainer.step == 3 * 6
    last = history[-1]
    assert last["train_loss"] < history[0]["train_loss"]
    # 10 classes: chance is 0.1; three epochs on 240 images get the last exit well above it.
    assert last["test_acc"][-1] > 0.3 and last["val_acc"][-1] > 0.3
    assert len(last["test_acc"]) == len(last["val_loss"]) == len(last["weights"]) == 3
    flops = last["exit_flops"]
    assert flops == sorted(flops) and flops[0] == pytest.approx(2 * (784 * 32 + 32 * 10))
    # AdaLoss (the original's normalisation): max-normalised, then mixed with gamma = 0.07, so the
    # largest weight is 1 and none is below gamma; not all equal once the losses differ.
    assert max(last["weights_last"]) == pytest.approx(1.0, rel=1e-5)
    assert min(last["weights_last"]) >= 0.07 - 1e-6
    assert max(last["weights_last"]) - min(last["weights_last"]) > 1e-3
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(records) == 3 and records[-1]["test_acc"] == last["test_acc"]
    assert records[0]["weights_trace"]["step"][0] == 0
    for name in ("anytime.png", "weights.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 18
    assert set(ckpt["rng"]) == {"torch", "numpy", "python", "loader"}
    assert set(ckpt) >= {"model", "loss", "optimizer", "scheduler", "config", "spec"}


@pytest.mark.parametrize("weighting", ["adaloss", "oscillating"])
def test_resume_is_bit_exact(tiny_data, tmp_path, weighting):
    """2 epochs straight == 1 epoch, a 'crash', then resume for the 2nd epoch: every parameter,
    buffer, optimiser state and loss-module state is bit-identical."""
    straight = make_trainer(tiny_data, tmp_path / "a", weighting)
    straight.fit()
    first = make_trainer(tiny_data, tmp_path / "b", weighting)
    first.fit(until_epoch=1)
    del first
    torch.manual_seed(12345)  # the resumed process starts with different RNG states
    resumed = make_trainer(tiny_data, tmp_path / "b", weighting, resume=True)
    assert resumed.epoch == 1 and resumed.step == 6
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.loss_fn.state_dict().items(), resumed.loss_fn.state_dict().values()):
        assert torch.equal(a, b), name
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)
    rec_a, rec_b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert len(rec_b) == 2
    for key in ("train_loss", "weights", "test_acc", "val_loss", "lr"):
        assert rec_a[-1][key] == rec_b[-1][key], key


def test_resume_depends_on_restored_state(tiny_data, tmp_path):
    """The exactness above is not vacuous: a fresh run with another seed ends elsewhere."""
    a = make_trainer(tiny_data, None, "const", epochs=1)
    a.fit()
    b = make_trainer(tiny_data, None, "const", epochs=1, seed=1)
    b.fit()
    assert not torch.equal(a.model.heads[0].weight, b.model.heads[0].weight)


def test_resume_refuses_other_settings(tiny_data, tmp_path):
    make_trainer(tiny_data, tmp_path, "const", epochs=1).fit()
    with pytest.raises(ValueError, match=r"last\.pt: was trained with epochs=1 but this run has epochs=2"):
        make_trainer(tiny_data, tmp_path, "const", epochs=2, resume=True)


def test_fresh_run_forgets_old_metrics(tiny_data, tmp_path):
    make_trainer(tiny_data, tmp_path, "const", epochs=1).fit()
    make_trainer(tiny_data, tmp_path, "const", epochs=1).fit()
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


@pytest.mark.parametrize("weighting,opt,bf16", [("const", "adamw", False), ("linear", "sgd", True)])
def test_other_optimisers_weightings_and_bf16(tiny_data, weighting, opt, bf16):
    trainer = make_trainer(tiny_data, None, weighting, epochs=1, optimizer=opt, bf16=bf16,
                           lr=None if opt == "adamw" else 0.05)
    record = trainer.fit()[-1]
    assert isinstance(trainer.optimizer, torch.optim.AdamW if opt == "adamw" else torch.optim.SGD)
    assert all(0.0 <= a <= 1.0 for a in record["test_acc"])
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0


@pytest.mark.parametrize("weighting", ["adaloss", "opt"])
def test_reference_weight_decay_mode_builds_the_original_groups(tiny_data, weighting):
    """TrainConfig(weight_decay_mode="reference"): conv/linear weights decayed, the heads' FC
    weight and bias times the scheme's static weight (AdaLoss: SIEVE; OPT: one-hot), no BN."""
    from ann_kernels.losses import sieve_weights
    from ann_kernels.nn import resann

    trainer = make_trainer(tiny_data, None, weighting, epochs=1, weight_decay=1e-4, weight_decay_mode="reference",
                           model_fn=lambda: resann(num_classes=10, in_channels=1, image_size=28, width=4))
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert len(decay) == len(list(trainer.model.parameters()))
    static = sieve_weights(6) if weighting == "adaloss" else torch.eye(6)[-1]
    for k, head in enumerate(trainer.model.heads):
        assert decay[id(head.linear.weight)] == pytest.approx(1e-4 * float(static[k]))
        assert decay[id(head.linear.bias)] == pytest.approx(1e-4 * float(static[k]))
    for m in trainer.model.modules():
        if isinstance(m, nn.Conv2d):
            assert decay[id(m.weight)] == 1e-4
        if isinstance(m, nn.BatchNorm2d):
            assert decay[id(m.weight)] == decay[id(m.bias)] == 0.0
    assert torch.isfinite(torch.tensor(trainer.fit()[-1]["train_loss"]))
    all_mode = make_trainer(tiny_data, None, weighting, epochs=1, weight_decay=1e-4)
    assert [g["weight_decay"] for g in all_mode.optimizer.param_groups] == [1e-4]


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_on_device(device):
    """The training step the Trainer runs (forward, AnytimeLoss with the reference AdaLoss,
    backward, SGD with the reference weight-decay groups) on each device: the loss falls,
    the AdaLoss state stays on the device and updates on the original's timing."""
    from ann_kernels.nn import resann
    from ann_kernels.train.weight_decay import weight_decay_groups

    torch.manual_seed(0)
    model = resann(num_classes=4, in_channels=1, image_size=12, width=4).to(device)
    loss_fn = AnytimeLoss(model.num_exits, "adaloss", update_every=4).to(device)
    opt = torch.optim.SGD(weight_decay_groups(model, 1e-4, "reference", loss_fn.weighting.decay_weights()),
                          lr=0.05, momentum=0.9)
    x = torch.randn(32, 1, 12, 12, device=device)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :6].mean(dim=(1, 2)) > 0).long()
    losses, weights = [], []
    for _ in range(12):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        weights.append(loss_fn.weights.detach().cpu().clone())
    assert loss_fn.weighting.ema.device.type == torch.device(device).type
    assert losses[-1] < losses[0]
    assert all(torch.equal(w, torch.ones(6)) for w in weights[:4])
    assert not torch.equal(weights[4], weights[3]) and torch.equal(weights[5], weights[4])


def test_config_errors_name_the_argument(tiny_data):
    with pytest.raises(ValueError, match="optimizer: expected one of .* got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs: expected a positive integer, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr: expected a positive learning rate, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="weight_decay_mode: expected one of .* got 'bn'"):
        TrainConfig(weight_decay_mode="bn")
    with pytest.raises(ValueError, match="batch_size: 1000 .* larger than the training set"):
        make_trainer(tiny_data, None, batch_size=1000)
    with pytest.raises(ValueError, match="until_epoch: expected 0..2, got 5"):
        make_trainer(tiny_data, None).fit(until_epoch=5)


def test_plots_write_pngs(tmp_path):
    flops = [1e6, 2e6, 4e6]
    p = plot_anytime({"const": (flops, [0.5, 0.6, 0.7]), "adaloss": (flops, [[0.6, 0.65, 0.7], [0.62, 0.66, 0.69]])},
                     tmp_path / "sub" / "anytime.png")
    assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    q = plot_weights([0, 10, 20], [[1, 1, 1], [1.2, 1, 0.8], [1.3, 0.9, 0.8]], tmp_path / "w.png")
    assert q.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="runs\\['x'\\]: 2 accuracies for 3 exits"):
        plot_anytime({"x": (flops, [0.1, 0.2])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="steps / weights"):
        plot_weights([0], [], tmp_path / "bad.png")


def test_demo_plot_shows_opt_as_a_point_and_zooms_to_the_curves():
    """issue 21: OPT's untrained early exits (2-20 %) must not squash CONST and AdaLoss into one line."""
    from ann_kernels.train.compare import anytime_plot_inputs
    from ann_kernels.train.plots import anytime_figure

    flops = [1e6, 2e6, 3e6]
    summary = {"exit_flops": flops, "runs": {
        "const": {"0": {"test_acc": [0.84, 0.88, 0.899]}, "1": {"test_acc": [0.85, 0.89, 0.901]}},
        "adaloss": {"0": {"test_acc": [0.80, 0.87, 0.893]}, "1": {"test_acc": [0.81, 0.88, 0.895]}},
        "opt": {"0": {"test_acc": [0.02, 0.20, 0.890]}, "1": {"test_acc": [0.03, 0.15, 0.892]}}}}
    inputs = anytime_plot_inputs(summary)
    assert set(inputs["runs"]) == {"const", "adaloss"}
    assert inputs["references"] == {"OPT (final exit only)": (3e6, [0.890, 0.892])}
    fig = anytime_figure(**inputs)
    acc_ax, delta_ax = fig.axes
    lo, hi = acc_ax.get_ylim()
    assert 79.0 < lo < 80.5 and 90.1 < hi < 91.0, (lo, hi)  # the curves' ±std span plus a 5 % margin
    drawn = [y for line in acc_ax.get_lines() for y in line.get_ydata()]
    assert min(drawn) > 79 and 89.1 in [round(y, 6) for y in drawn]  # OPT: its final exit's mean only
    # The panel below: adaloss - const per exit, mean of the paired per-seed differences, in points.
    diffs = [line.get_ydata() for line in delta_ax.get_lines() if len(line.get_ydata()) == 3]
    assert [round(d, 6) for d in diffs[0]] == [-4.0, -1.0, -0.6]
    # OPT alone is still drawn as a curve (nothing else to compare with).
    alone = anytime_plot_inputs({"exit_flops": flops, "runs": {"opt": summary["runs"]["opt"]}})
    assert set(alone["runs"]) == {"opt"} and alone["references"] is None


def test_exit_table_mean_std_and_delta():
    table = exit_table([1.5e6, 3e6], {"const": [[0.5, 0.8], [0.7, 0.8]], "adaloss": [0.7, 0.79]},
                       delta=("const", "adaloss"))
    lines = table.splitlines()
    assert "const acc %" in lines[0] and "adaloss - const" in lines[0]
    assert lines[2].split() == ["1", "1.50M", "60.00", "±", "14.14", "70.00", "+10.00"]
    assert lines[3].split() == ["2", "3.00M", "80.00", "±", "0.00", "79.00", "-1.00"]
    md = exit_table([1e3], {"a": [0.25]}, markdown=True)
    assert md.splitlines()[2] == "| 1 | 1.00k | 25.00 |"
    with pytest.raises(ValueError, match="columns\\['a'\\]: expected 2 values"):
        exit_table([1, 2], {"a": [0.1]})
    assert format_flops(2.5e9) == "2.50G" and format_flops(12) == "12"
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))


def test_metrics_jsonl_is_one_json_object_per_epoch(tiny_data, tmp_path):
    make_trainer(tiny_data, tmp_path, "const", epochs=2).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[1])
    assert {"epoch", "step", "lr", "train_loss", "train_exit_loss", "weights", "val_acc", "test_acc",
            "exit_flops", "time_s"} <= set(rec)
    assert rec["weights"] == [1.0, 1.0, 1.0]  # CONST
