"""EANN: builder cost growth, sequence costs, anytime prediction (budget and deadline),
early exit over the sequence, evaluation metrics, checkpoints, CLI and bad input."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from torch import nn

import ann_kernels
from ann_kernels import EANN, EANNEngine, eann
from ann_kernels.cli import main as cli_main
from ann_kernels.nn import MultiExitNetwork, mlp_ann, resann
from ann_kernels.ops.early_exit import exit_confidence
from ann_kernels.sequence.evaluation import anytime_accuracy, cost_inflation, min_budget_for


def _mlp_eann(num_members=3, hidden=16, exits=None, seed=0, in_features=32):
    torch.manual_seed(seed)
    x = torch.randn(4, in_features)
    return eann(mlp_ann, num_members, 2.0, example_input=x, scale="hidden", hidden=hidden,
                in_features=in_features, num_exits=4, exits=exits).eval()


# ---------------------------------------------------------------------------- builder


def _flop_counter_cost(member: MultiExitNetwork, x: torch.Tensor) -> float:
    """Oracle: per-sample FLOPs of member's last exit (all stages + every head on the way, as
    an anytime run pays), counted by ``FlopCounterMode`` around the forward path itself, on a
    batch of len(x) samples."""
    from torch.utils.flop_counter import FlopCounterMode

    member.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        h = x
        for k in range(member.num_exits):
            h = member.forward_stage(k, h)
            member.forward_head(k, h)
    return counter.get_total_flops() / x.shape[0]


@pytest.mark.parametrize("growth", [2.0, 3.0])
def test_builder_width_costs_grow_by_growth(growth):
    x = torch.randn(2, 64)
    model = eann(mlp_ann, 4, growth, example_input=x, scale="hidden", hidden=32, in_features=64)
    info = model.build_info
    flops = model.member_flops(x)
    assert flops.tolist() == list(info.member_flops)
    # Each member's measured FLOPs are its own exit_flops (FlopCounterMode) of the last exit.
    for member, f in zip(model.members, flops):
        assert float(member.exit_flops(x)[-1]) == f
    ratios = model.cost_ratios(x)
    assert ratios.tolist() == pytest.approx(list(info.cost_ratios))
    assert all(abs(math.log(r / growth)) < math.log(1.1) for r in ratios), ratios
    # The reported costs agree with FlopCounterMode around the actual forward path, and each
    # member's width is the closest to its target cost: both neighbours are further from it.
    oracle = [_flop_counter_cost(m, x) for m in model.members]
    assert list(info.member_flops) == pytest.approx(oracle, rel=1e-9)
    for j in range(1, 4):
        target = oracle[0] * growth ** j
        error = abs(math.log(oracle[j] / target))
        for other in (info.values[j] - 1, info.values[j] + 1):
            if other > info.values[j - 1]:
                cost = _flop_counter_cost(mlp_ann(hidden=other, in_features=64), x)
                assert abs(math.log(cost / target)) >= error - 1e-12, (j, other)
    # Cumulative growth stays on target (no drift): member j costs ~ growth^j x member 0.
    assert all(abs(math.log(flops[j] / flops[0] / growth ** j)) < math.log(1.1) for j in range(4))
    assert list(info.values) == sorted(set(info.values))
    text = repr(model)
    assert "measured_cost_ratios=[" in text and "scale=hidden=" in text


def test_builder_depth_scaling_resann_and_rng():
    x = torch.randn(1, 1, 28, 28)
    torch.manual_seed(3)
    model = eann(resann, 3, 2.0, example_input=x, width=4, num_exits=2)
    assert model.build_info.scale == "num_exits"  # the default: a depth
    assert [m.num_exits for m in model.members] == list(model.build_info.values)
    assert all(1.6 < r < 2.5 for r in model.build_info.cost_ratios)
    # Reported costs and ratios = FlopCounterMode around the forward path (batch of 1 here;
    # per-sample costs must not depend on the batch: check with a batch of 3 as well).
    oracle = [_flop_counter_cost(m, x) for m in model.members]
    assert list(model.build_info.member_flops) == pytest.approx(oracle, rel=1e-9)
    assert oracle[0] == pytest.approx(_flop_counter_cost(model.members[0], x.expand(3, -1, -1, -1)), rel=1e-9)
    measured = [b / a for a, b in zip(oracle, oracle[1:])]
    assert list(model.build_info.cost_ratios) == pytest.approx(measured, rel=1e-9)
    print(f"resann depth scaling: num_exits {list(model.build_info.values)}, "
          f"FlopCounterMode cost ratios {[round(r, 3) for r in measured]}")
    # Cost measurements do not consume the caller's RNG: the members equal direct builds.
    torch.manual_seed(3)
    direct = [resann(width=4, num_exits=v) for v in model.build_info.values]
    for a, b in zip(model.members, direct):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)


def test_builder_bad_input():
    x = torch.randn(2, 16)
    for growth in (1.0, 0.5, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"growth: .*> 1.*got {re.escape(repr(growth))}$"):
            eann(mlp_ann, 3, growth, example_input=x, in_features=16)
    with pytest.raises(ValueError, match="num_members: .*got 0"):
        eann(mlp_ann, 0, 2.0, example_input=x, in_features=16)
    with pytest.raises(ValueError, match="scale"):
        eann(mlp_ann, 2, 2.0, example_input=x, scale="no_such_arg", in_features=16)
    with pytest.raises(ValueError, match="start"):
        eann(mlp_ann, 2, 2.0, example_input=x, scale="hidden", start=0, in_features=16)
    # a keyword that does not change the cost: a clear error, not an endless search.
    def padded_mlp(pad: int = 1, **kwargs):
        return mlp_ann(**kwargs)

    with pytest.raises(ValueError, match="scale"):
        eann(padded_mlp, 2, 2.0, example_input=x, scale="pad", in_features=16, num_classes=2)
    with pytest.raises(TypeError, match="builder"):
        eann("mlp_ann", 2, 2.0, example_input=x)


def test_eann_bad_members():
    a = mlp_ann(in_features=8, hidden=8, num_classes=10)
    with pytest.raises(ValueError, match="members: .*empty"):
        EANN([])
    with pytest.raises(ValueError, match=r"members: .*num_classes, got \[10, 5\].*members\[1\] has 5"):
        EANN([a, mlp_ann(in_features=8, hidden=8, num_classes=5)])
    with pytest.raises(TypeError, match=r"members\[1\]"):
        EANN([a, nn.Linear(8, 10)])
    with pytest.raises(TypeError, match="members"):
        EANN(a)
    unknown = MultiExitNetwork([nn.Linear(8, 8)], [nn.Linear(8, 10)])
    with pytest.raises(ValueError, match=r"members\[0\].*num_classes"):
        EANN([unknown])
    with pytest.raises(ValueError, match=r"exits\[0\]"):
        EANN([a], exits=[[6]])
    with pytest.raises(ValueError, match="exits"):
        EANN([a], exits=[[0], [1]])


# ---------------------------------------------------------------------------- costs


def test_sequence_exit_costs_and_extra_cost():
    model = _mlp_eann(3, exits=[None, [2, 3], [2, 3]])
    x = torch.randn(3, 32)
    member = [m.exit_flops(x) for m in model.members]
    expected = member[0].tolist()
    expected += [float(member[0][-1]) + float(member[1][k]) for k in (2, 3)]
    offset = float(member[0][-1] + member[1][-1])
    expected += [offset + float(member[2][k]) for k in (2, 3)]
    assert model.exit_flops(x).tolist() == pytest.approx(expected)
    assert model.exit_map == ((0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3))
    total, largest = expected[-1], float(member[2][-1])
    assert model.extra_cost_fraction(x) == pytest.approx((total - largest) / largest)
    logits = model(x)
    assert len(logits) == model.num_exits == 8
    for g in range(model.num_exits):
        torch.testing.assert_close(model.forward_exit(g, x), logits[g])


# ---------------------------------------------------------------------------- anytime


def test_anytime_budget_returns_latest_finished_exit():
    model = _mlp_eann(3, exits=[None, [2, 3], [1, 2, 3]])
    x = torch.randn(50, 32)
    costs = model.exit_flops(x).tolist()
    logits = model(x)
    checks = []
    for g, c in enumerate(costs):
        checks.append((c, g))                                        # exactly at exit g's cost
        if g + 1 < len(costs):
            checks.append(((c + costs[g + 1]) / 2, g))              # between two exits
            checks.append((costs[g + 1] * (1 - 1e-6), g))           # just before the next one
    checks.append((costs[-1] * 10, len(costs) - 1))                  # above the whole sequence
    for budget, g in checks:
        result = model.anytime_predict(x, budget=budget)
        assert result.exit_index == g, (budget, g)
        assert (result.member, result.member_exit) == model.exit_map[g]
        assert torch.equal(result.prediction, logits[g].argmax(dim=1))
        assert result.sequence_flops == costs[g]
        j, k = model.exit_map[g]
        # the budgeted call runs straight to exit g: member j's stages 0..k and head k only
        member = model.members[j]
        assert result.executed_flops == pytest.approx(float(member.stage_flops(x)[:k + 1].sum()
                                                            + member.head_flops(x)[k]))
    with pytest.raises(ValueError, match="budget.*below the cheapest"):
        model.anytime_predict(x, budget=costs[0] * 0.5)
    with pytest.raises(ValueError, match="budget"):
        model.anytime_predict(x, budget=float("nan"))
    assert model.anytime_predict(x).exit_index == len(costs) - 1
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.anytime_predict(x, budget=costs[-1])


class _Sleepy(nn.Module):
    """Linear(8, 8) after sleeping ``seconds``: a stage with a known duration."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.linear(x)


def _sleepy_member(num_exits: int, seconds: float) -> MultiExitNetwork:
    return MultiExitNetwork([_Sleepy(seconds) for _ in range(num_exits)],
                            [nn.Linear(8, 10) for _ in range(num_exits)], num_classes=10)


def test_anytime_deadline_returns_latest_exit_finished_in_time():
    torch.manual_seed(0)
    step = 0.1  # exits finish at ~0.1, 0.2 (member 0) and ~0.3, 0.4 (member 1)
    model = EANN([_sleepy_member(2, step), _sleepy_member(2, step)]).eval()
    x = torch.randn(6, 8)
    logits = model(x)  # (no FLOP measurement inside the timed calls below either way)

    result = model.anytime_predict(x, deadline_s=2.5 * step)
    assert result.exit_index == 1 and result.deadline_met and result.exits_finished == 2
    assert torch.equal(result.prediction, logits[1].argmax(1))
    assert result.seconds < 3.9 * step  # stopped at the first exit finishing late (~0.3 s)

    result = model.anytime_predict(x, deadline_s=0.0)  # not even exit 0 in time: exit 0, flagged
    assert result.exit_index == 0 and result.deadline_met is False and result.exits_finished == 0
    assert torch.equal(result.prediction, logits[0].argmax(1))

    result = model.anytime_predict(x, deadline_s=60.0)
    assert result.exit_index == 3 and result.deadline_met and result.exits_finished == 4

    # Budget and deadline together: whichever comes first.
    costs = model.exit_flops(x)
    result = model.anytime_predict(x, budget=float(costs[1]), deadline_s=60.0)
    assert result.exit_index == 1 and result.seconds < 2.9 * step
    with pytest.raises(ValueError, match="deadline_s"):
        model.anytime_predict(x, deadline_s=-1.0)

    # The early-exit engine keeps the same rule for the samples still running.
    engine = EANNEngine(model)
    out = engine.predict(x, thresholds=[math.inf] * 4, deadline_s=2.5 * step)
    assert out.exit_index.tolist() == [1] * 6 and out.stats.deadline_exit == 2
    assert torch.equal(out.prediction, logits[1].argmax(1))


# ---------------------------------------------------------------------------- early exit


def _first_passing(confidence, thresholds):
    passes = confidence >= thresholds.to(confidence.dtype)[:, None]
    passes[-1] = True
    return passes.to(torch.int8).argmax(dim=0)


def _sequence_and_data(*, model_seed: int, data_seed: int, n_val: int, n_test: int):
    """A 3-member MLP EANN whose later members exit at their stages 2 and 3, and random inputs
    [n, 32] with labels in 0..9: (model, (x_val, y_val, x_test))."""
    model = _mlp_eann(3, exits=[None, [2, 3], [2, 3]], seed=model_seed)
    gen = torch.Generator().manual_seed(data_seed)
    x_val, y_val = torch.randn(n_val, 32, generator=gen), torch.randint(0, 10, (n_val,), generator=gen)
    return model, (x_val, y_val, torch.randn(n_test, 32, generator=gen))


def test_early_exit_over_sequence_matches_calibration():
    model, (x_val, y_val, x_test) = _sequence_and_data(model_seed=1, data_seed=0, n_val=400, n_test=300)
    engine = EANNEngine(model)
    calibration = engine.calibrate(x_val, y_val, batch_size=128)
    costs = model.exit_flops(x_val)
    assert calibration.confidence.shape == (model.num_exits, 400)
    assert torch.equal(calibration.exit_flops, costs)
    test_logits = model(x_test)
    test_conf = torch.stack([exit_confidence(z)[0] for z in test_logits])
    test_pred = torch.stack([z.argmax(1) for z in test_logits])
    from ann_kernels.inference.calibration import calibrate_for_budget

    # The held-out confidences are the sequence exits' own (member j's exit k, in order).
    val_logits = model(x_val)
    torch.testing.assert_close(calibration.confidence, torch.stack([exit_confidence(z)[0] for z in val_logits]))
    for budget in (float(costs[0]), float(costs[2]), float(costs[5]), float(costs[-1])):
        cal = engine.calibrate_budget(budget)
        # Same calibration code as single networks, on the [G, N] sequence arrays.
        direct = calibrate_for_budget(calibration.confidence, calibration.correct, costs, budget)
        assert torch.equal(torch.as_tensor(cal.thresholds), torch.as_tensor(direct.thresholds))
        # On the calibration split itself the run reproduces the held-out numbers.
        on_val = engine.predict(x_val, budget=budget)
        assert on_val.stats.mean_flops == pytest.approx(cal.mean_flops)
        assert on_val.stats.mean_flops <= budget * (1 + 1e-9)
        assert float((on_val.prediction == y_val).double().mean()) == pytest.approx(cal.accuracy)
        # On other data: every sample leaves at its first exit whose confidence passes.
        out = engine.predict(x_test, thresholds=cal.thresholds)
        expected_exit = _first_passing(test_conf, cal.thresholds)
        assert torch.equal(out.exit_index, expected_exit)
        assert torch.equal(out.prediction, test_pred.gather(0, expected_exit[None])[0])
        assert out.stats.mean_flops == pytest.approx(float(costs[expected_exit].mean()))
        assert sum(out.stats.samples_per_exit) == 300
    everyone_last = engine.predict(x_test, thresholds=[math.inf] * model.num_exits)
    assert torch.equal(everyone_last.prediction, test_pred[-1])
    with pytest.raises(ValueError, match="thresholds"):
        engine.predict(x_test, thresholds=[0.5] * 3)
    with pytest.raises(ValueError, match="budget"):
        engine.predict(x_test, budget=float(costs[0]) / 2)


# ---------------------------------------------------------------------------- metrics


def test_cost_inflation_and_envelope_by_hand():
    members = [([1.0, 2.0], [0.5, 0.6]), ([2.0, 4.0], [0.55, 0.8])]
    seq_costs, seq_acc = [1.0, 2.0, 6.0], [0.5, 0.6, 0.8]   # member 0's exits, then member 1's last
    assert min_budget_for(members, 0.6) == 2.0 and min_budget_for(members, 0.8) == 4.0
    assert min_budget_for(members, 0.9) == math.inf
    out = cost_inflation(seq_costs, seq_acc, members)
    assert out["at_exits"] == pytest.approx([1.0, 1.0, 1.5])
    assert out["sup_before_next"] == pytest.approx([2.0, 3.0, 1.5])
    assert out["max"] == pytest.approx(3.0) and out["argmax_budget"] == 6.0
    assert out["mean"] == pytest.approx((1.0 / 1.0 + 4.0 / 2.0) / math.log(6.0))
    acc = anytime_accuracy(seq_costs, seq_acc, [0.5, 1.0, 1.5, 5.9, 6.0, 7.0])
    assert math.isnan(acc[0]) and acc[1:].tolist() == pytest.approx([0.5, 0.5, 0.6, 0.8, 0.8])


def test_prune_exits_keeps_only_improving_exits():
    from ann_kernels.sequence.evaluation import MemberOutputs, prune_exits

    model = _mlp_eann(3, exits=[None, [2, 3], [1, 2, 3]])

    def outputs(accuracies):  # 10 held-out samples; exit k right on the first 10 * acc of them
        correct = torch.tensor([[i < round(10 * a) for i in range(10)] for a in accuracies])
        return MemberOutputs(torch.rand(len(accuracies), 10), correct)

    calib = [outputs([0.3, 0.5, 0.4, 0.6]), outputs([0.9, 0.9, 0.5, 0.7]), outputs([0.1, 0.6, 0.8, 0.7])]
    # sequence order: 0.3 0.5 0.4 0.6 | 0.5 0.7 | 0.6 0.8 0.7  -> kept: 0.3 0.5 0.6 0.7 0.8
    assert prune_exits(model, calib) == [[0, 1, 3], [3], [2]]
    calib[1] = outputs([0.9, 0.9, 0.5, 0.6])  # member 1 never beats member 0's final exit: dropped
    assert prune_exits(model, calib) == [[0, 1, 3], [], [2]]


# ---------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip():
    a, b = _mlp_eann(2, seed=0), _mlp_eann(2, seed=1)
    x = torch.randn(5, 32)
    assert not torch.equal(a(x)[-1], b(x)[-1])
    b.load_state_dict(a.state_dict())
    for za, zb in zip(a(x), b(x)):
        assert torch.equal(za, zb)


def _train_args(out, *extra):
    return ["eann", "train", "--dataset", "synthetic", "--limit-train", "256", "--limit-eval", "128",
            "--model", "mlp", "--num-exits", "4", "--model-arg", "hidden=16", "--scale", "hidden",
            "--members", "2", "--growth", "2", "--epochs", "1", "--batch-size", "64", "--no-progress",
            "--num-budgets", "3", "--out", str(out), *extra]


def test_train_checkpoint_round_trip_and_cli(tmp_path, capsys):
    from ann_kernels.sequence.training import load_eann

    out = tmp_path / "run"
    results = tmp_path / "results.md"
    head = "# Results\n\n## EANN (mine)\n\n"
    tail = "\n## Next\n\nother sections stay\n"
    results.write_text(head + "<!-- eann:begin -->\nold numbers\n<!-- eann:end -->\n" + tail)
    assert cli_main(_train_args(out, "--results-md", str(results))) == 0
    manifest = json.loads((out / "eann.json").read_text())
    assert [m["weighting"] for m in manifest["members"]] == ["sieve", "eann_sieve"]
    # EANN-SIEVE zeroes member 1's first floor(K/2) = 2 exits: the sequence skips them.
    assert manifest["members"][0]["exits"] == [0, 1, 2, 3] and manifest["members"][1]["exits"] == [2, 3]
    assert all(1.6 < r < 2.5 for r in manifest["cost_ratios"])
    for j in range(2):
        assert (out / f"member{j}" / "last.pt").is_file()
    model, manifest2 = load_eann(out)
    assert manifest2 == manifest and model.exits == ((0, 1, 2, 3), (2, 3))
    # The member checkpoints hold the trained weights: reloading gives the same outputs.
    again, _ = load_eann(out)
    x = torch.randn(7, 1, 28, 28)
    for za, zb in zip(model(x), again(x)):
        assert torch.equal(za, zb)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["inflation"]["max"] >= 1.0 and evaluation["inflation"]["mean"] >= 1.0
    assert len(evaluation["sequence_accuracy"]) == model.num_exits
    for row in evaluation["early_exit"]:
        if "eann_run_accuracy" in row:  # the real run reproduces the simulation
            assert row["eann_run_accuracy"] == pytest.approx(row["eann_accuracy"])
            assert row["eann_run_flops"] == pytest.approx(row["eann_flops"])
        if "pruned_run_accuracy" in row:  # the same for the val-pruned sequence
            assert row["pruned_run_accuracy"] == pytest.approx(row["pruned_accuracy"])
            assert row["pruned_run_flops"] == pytest.approx(row["pruned_flops"])
    assert any("pruned_run_accuracy" in row for row in evaluation["early_exit"])
    for row in evaluation["early_exit"]:  # the best-member baseline is chosen on the calibration split
        if "best_member" in row:
            vals = {j: row[f"member{j}_val_accuracy"] for j in range(model.num_members) if f"member{j}_val_accuracy" in row}
            assert row["best_member"] == max(vals, key=lambda j: (vals[j], -j))
            assert row["best_member_accuracy"] == row[f"member{row['best_member']}_accuracy"]
    assert (out / "eann_anytime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = results.read_text()
    # The block between the markers is replaced in place; the rest of the file is untouched.
    assert text.startswith(head + "<!-- eann:begin -->\nSetup: synthetic") and text.endswith("<!-- eann:end -->\n" + tail)
    assert "old numbers" not in text and text.count("<!-- eann:begin -->") == 1
    assert "| seq. exit | member.exit |" in text and "cost inflation" in text
    # --resume keeps finished members; eval rewrites the section in place.
    stamp = (out / "member1" / "last.pt").stat().st_mtime_ns
    assert cli_main(_train_args(out, "--resume", "--no-eval")) == 0
    assert (out / "member1" / "last.pt").stat().st_mtime_ns == stamp
    assert cli_main(["eann", "eval", "--run", str(out), "--results-md", str(results), "--num-budgets", "2"]) == 0
    assert results.read_text().count("<!-- eann:begin -->") == 1 and results.read_text().endswith(tail)
    # A file without markers gets the block appended under its own heading.
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# Other\n")
    assert cli_main(["eann", "eval", "--run", str(out), "--results-md", str(fresh), "--num-budgets", "1",
                     "--no-progress"]) == 0
    assert fresh.read_text().startswith("# Other\n\n## EANN\n\n<!-- eann:begin -->\nSetup: ")
    capsys.readouterr()
    assert cli_main(_train_args(tmp_path / "bad", "--growth", "1")) == 2
    assert "growth" in capsys.readouterr().err
    assert cli_main(["eann", "eval", "--run", str(tmp_path / "missing")]) == 2


def test_public_exports():
    assert ann_kernels.EANN is EANN and ann_kernels.eann is eann and "EANNEngine" in ann_kernels.__all__


# ---------------------------------------------------------------------------- devices


def test_early_exit_over_sequence_on_device(device):
    """The EANN engine on ``device``: each sample leaves at its first exit whose confidence
    (the kernel's, on that device) passes; against the CPU run, decisions agree except for
    samples whose CPU confidence sits within float rounding of a threshold."""
    model, (x_val, y_val, x_test) = _sequence_and_data(model_seed=2, data_seed=4, n_val=300, n_test=200)
    cpu_engine = EANNEngine(model)
    cal = cpu_engine.calibrate(x_val, y_val, batch_size=128)
    thresholds = cpu_engine.calibrate_budget(float(cal.exit_flops[3])).thresholds
    cpu_out = cpu_engine.predict(x_test, thresholds=thresholds)
    cpu_conf = torch.stack([exit_confidence(z)[0] for z in model(x_test)])

    model_dev = model.to(device)
    engine = EANNEngine(model_dev)
    out = engine.predict(x_test.to(device), thresholds=thresholds)
    logits = model_dev(x_test.to(device))
    conf = torch.stack([exit_confidence(z)[0] for z in logits]).cpu()
    expected_exit = _first_passing(conf, torch.as_tensor(thresholds))
    assert out.exit_index.device.type == torch.device(device).type
    assert torch.equal(out.exit_index.cpu(), expected_exit)
    preds = torch.stack([z.argmax(1) for z in logits]).cpu()
    assert torch.equal(out.prediction.cpu(), preds.gather(0, expected_exit[None])[0])
    thr = torch.as_tensor(thresholds, dtype=torch.float32)[:, None]
    near = ((cpu_conf - thr).abs() < 1e-4)[:-1].any(dim=0)  # a tie at some exit before the last
    assert torch.equal(out.exit_index.cpu()[~near], cpu_out.exit_index[~near])
