"""CLI ``calibrate`` and ``infer`` on a checkpoint in the trainer's format: what they print and
write equals what the Python API computes on the same checkpoint and data."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ann_kernels import EarlyExitEngine
from ann_kernels.inference.calibration import simulate_thresholds
from ann_kernels.train.runs import load_data, load_trained
from tests.early_exit_helpers import INF, mlp_checkpoint  # noqa: F401  (fixture)
from tests.utils import requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]


def api_engine(checkpoint):
    """The API's view of the checkpoint: (calibrated engine, test inputs, test labels)."""
    model, spec, _ = load_trained(checkpoint)
    data = load_data(spec)
    engine = EarlyExitEngine(model)
    engine.calibrate(data.val, batch_size=256)
    x, y = data.test.tensors
    return engine, data, x, y


def test_cli_calibrate_and_infer(mlp_checkpoint, tmp_path, capsys):
    from ann_kernels import cli

    engine, data, x, y = api_engine(mlp_checkpoint)
    full = float(engine.calibration.exit_flops[-1])
    test = engine.exit_outputs(data.test)
    out = tmp_path / "calib"
    args = ["calibrate", "--checkpoint", str(mlp_checkpoint), "--budgets", "0.95", "0.99", "--out", str(out),
            "--threads", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert (out / "budgeted.png").stat().st_size > 0
    saved = json.loads((out / "calibration.json").read_text())
    assert [row["budget"] for row in saved["budgets"]] == pytest.approx([0.95 * full, 0.99 * full])
    for row in saved["budgets"]:
        planned = engine.calibrate_budget(row["budget"])
        accuracy, cost, counts = simulate_thresholds(test.confidence, test.correct, test.exit_flops,
                                                     planned.thresholds)
        assert row["thresholds"] == planned.thresholds.tolist() and row["thresholds"][-1] == -INF
        assert row["val_acc"] == pytest.approx(planned.accuracy) and row["val_flops"] == pytest.approx(planned.mean_flops)
        assert row["test_acc"] == pytest.approx(float(accuracy)) and row["test_flops"] == pytest.approx(float(cost))
        assert row["test_exit_counts"] == counts.tolist()
        # the printed table row: test accuracy in % and the test exit counts
        assert f"{100 * float(accuracy):>10.2f} " in printed and str(counts.tolist()) in printed

    for stream in (False, True):
        args = ["infer", "--checkpoint", str(mlp_checkpoint), "--budget", "0.97", "--batch-size", "64",
                "--threads", "1", "--warmup", "1"] + (["--stream"] if stream else [])
        assert cli.main(args) == 0
        printed = capsys.readouterr().out
        thresholds = engine.calibrate_budget(0.97 * full).thresholds
        expected = [engine.predict(xb, thresholds=thresholds) for xb in torch.split(x, 64)]
        prediction = torch.cat([r.prediction for r in expected])
        counts = torch.bincount(torch.cat([r.exit_index for r in expected]), minlength=engine.num_exits).tolist()
        mean_flops = sum(r.stats.mean_flops * r.prediction.shape[0] for r in expected) / x.shape[0]
        with torch.no_grad():
            full_prediction = engine.model(x)[-1].argmax(dim=1)
        early = re.search(r"early exit : accuracy\s+([\d.]+)%\s+mean\s+([\d.]+) MFLOPs", printed)
        assert early, printed
        assert float(early.group(1)) == pytest.approx(100 * float((prediction == y).double().mean()), abs=0.006)
        assert float(early.group(2)) == pytest.approx(mean_flops / 1e6, abs=6e-4)
        full_line = re.search(r"full net   : accuracy\s+([\d.]+)%", printed)
        assert float(full_line.group(1)) == pytest.approx(100 * float((full_prediction == y).double().mean()),
                                                          abs=0.006)
        assert f"exits per stage {counts}" in printed


def test_cli_budget_out_of_range_is_a_one_line_error(mlp_checkpoint, capsys):
    from ann_kernels import cli

    engine, _, _, _ = api_engine(mlp_checkpoint)
    with pytest.raises(ValueError) as api_error:  # what the API says about the same budget
        engine.calibrate_budget(1e15)
    assert cli.main(["infer", "--checkpoint", str(mlp_checkpoint), "--budget", "1e15", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(api_error.value) in err
