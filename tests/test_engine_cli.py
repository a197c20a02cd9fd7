"""CLI ``calibrate`` and ``infer`` on a checkpoint in the trainer's format."""

from __future__ import annotations

import pytest

from tests.early_exit_helpers import INF, mlp_checkpoint  # noqa: F401  (fixture)
from tests.utils import requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]


def test_cli_calibrate_and_infer(mlp_checkpoint, tmp_path, capsys):
    from ann_kernels import cli

    out = tmp_path / "calib"
    assert (
        cli.main(
            [
                "calibrate",
                "--checkpoint",
                str(mlp_checkpoint),
                "--budgets",
                "0.95",
                "0.99",
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test acc %" in printed and (out / "budgeted.png").stat().st_size > 0
    import json

    saved = json.loads((out / "calibration.json").read_text())
    assert len(saved["budgets"]) == 2
    for row in saved["budgets"]:
        assert row["val_flops"] <= row["budget"] * (1 + 1e-9) and row["thresholds"][-1] == -INF
    assert (
        cli.main(
            [
                "infer",
                "--checkpoint",
                str(mlp_checkpoint),
                "--budget",
                "0.97",
                "--batch-size",
                "64",
                "--threads",
                "1",
                "--warmup",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "early exit : accuracy" in printed and "images/s" in printed and "speedup" in printed
    assert (
        cli.main(
            [
                "infer",
                "--checkpoint",
                str(mlp_checkpoint),
                "--budget",
                "0.97",
                "--stream",
                "--threads",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )


def test_cli_budget_out_of_range_is_a_one_line_error(mlp_checkpoint, capsys):
    from ann_kernels import cli

    assert cli.main(["infer", "--checkpoint", str(mlp_checkpoint), "--budget", "1e15", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and "above the full network" in err
