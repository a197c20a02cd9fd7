"""``ann-kernels`` CLI: train / eval / compare smoke runs on synthetic data, in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ann_kernels.cli import COMMAND_MODULES, build_parser, main
from ann_kernels.train import read_jsonl
from tests.utils import tiny_cli_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = tiny_cli_args(hidden=24, limit_train=200, limit_eval=100, epochs=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--weighting", "adaloss", "--epochs", "2", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_train_writes_run_dir_and_prints_table(trained, capsys):
    assert {p.name for p in trained.iterdir()} >= {"last.pt", "metrics.jsonl", "anytime.png", "weights.png"}
    assert (trained / "anytime.png").read_bytes()[:8] == PNG_MAGIC
    records = read_jsonl(trained / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and len(records[-1]["test_acc"]) == 3
    ckpt = torch.load(trained / "last.pt", weights_only=False)
    assert ckpt["spec"]["model"] == "mlp" and ckpt["spec"]["model_kwargs"] == {"num_exits": 3, "hidden": 24}
    assert ckpt["config"]["seed"] == 3 and ckpt["config"]["batch_size"] == 40


def test_eval_matches_training_metrics(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = read_jsonl(trained / "metrics.jsonl")[-1]
    assert result["n"] == 100
    assert result["acc"] == pytest.approx(last["test_acc"], abs=1e-12)
    assert result["exit_flops"] == last["exit_flops"]
    assert main(["eval", "--checkpoint", str(trained / "last.pt"), "--split", "val"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "trained 2 epochs on synthetic with adaloss; val split, 100 images" in lines[0]
    assert lines[1].split()[:4] == ["exit", "FLOPs", "rel.", "cost"]
    rows = [line.split() for line in lines[3:]]
    assert [r[0] for r in rows] == ["1", "2", "3"] and rows[-1][2] == "1.00"
    assert all(0 <= float(r[3]) <= 100 for r in rows)


def test_resume_continues_and_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", *TINY, "--weighting", "const", "--epochs", "2", "--out", str(out)]
    # (Bit-exact resumption mid-run is tested in test_trainer.py; here: the CLI plumbing.)
    assert main(args) == 0
    straight = torch.load(out / "last.pt", weights_only=False)["model"]
    assert main(args + ["--resume"]) == 0  # already complete: nothing more to train
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    again = torch.load(out / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    capsys.readouterr()
    assert main(["train", *TINY, "--weighting", "const", "--epochs", "3", "--out", str(out), "--resume"]) == 2
    assert "was trained with epochs=2 but this run has epochs=3" in capsys.readouterr().err


def test_compare_writes_table_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--weightings", "const", "adaloss", "--seeds", "0", "1", "--epochs", "1",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "const acc %" in table and "adaloss - const" in table and "±" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"const", "adaloss"} and set(summary["runs"]["const"]) == {"0", "1"}
    assert (out / "anytime.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "table.md").read_text().startswith("| exit | FLOPs |")
    # Runs already complete are reused, not retrained.
    mtime = (out / "const-s0" / "last.pt").stat().st_mtime_ns
    assert main(["compare", *TINY, "--weightings", "const", "--seeds", "0", "--epochs", "1",
                 "--out", str(out)]) == 0
    assert (out / "const-s0" / "last.pt").stat().st_mtime_ns == mtime
    # ... but not on the epoch count alone: another learning rate (same epochs) retrains.
    assert main(["compare", *TINY, "--weightings", "const", "--seeds", "0", "--epochs", "1", "--lr", "0.02",
                 "--out", str(out)]) == 0
    assert (out / "const-s0" / "last.pt").stat().st_mtime_ns != mtime
    assert torch.load(out / "const-s0" / "last.pt", weights_only=False)["config"]["lr"] == 0.02


def test_run_dir_complete_compares_config_and_spec(trained):
    from ann_kernels.train import TrainConfig
    from ann_kernels.train.runs import run_dir_complete

    ckpt = torch.load(trained / "last.pt", weights_only=False)
    cfg = TrainConfig.from_dict(ckpt["config"])
    spec = {k: v for k, v in ckpt["spec"].items() if k not in ("num_classes", "input_shape")}
    assert run_dir_complete(trained, cfg, spec)
    cfg.progress, cfg.log_every = not cfg.progress, 3  # display settings do not matter
    assert run_dir_complete(trained, cfg, spec)
    for change in ({"epochs": 3}, {"lr": 0.5}, {"weight_decay_mode": "reference"}, {"momentum": 0.5}):
        assert not run_dir_complete(trained, TrainConfig.from_dict({**ckpt["config"], **change}), spec), change
    assert not run_dir_complete(trained, cfg, {**spec, "weighting_kwargs": {"momentum": 0.5}})
    assert not run_dir_complete(trained, cfg, {**spec, "seed": 4})
    with pytest.raises(TypeError, match="config: expected a TrainConfig"):
        run_dir_complete(trained, 2)


def test_compare_gives_weighting_args_only_to_schemes_that_take_them(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--weightings", "const", "adaloss", "opt", "--seeds", "0", "--epochs", "1",
                 "--weighting-arg", "update_every=2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OPT reference (trained at the final exit only, 1 seed): final-exit test acc" in text
    assert "final exit minus OPT: const" in text and "opt acc" not in text
    specs = {w: torch.load(out / f"{w}-s0" / "last.pt", weights_only=False)["spec"]["weighting_kwargs"]
             for w in ("const", "adaloss", "opt")}
    assert specs == {"const": {}, "adaloss": {"update_every": 2}, "opt": {}}
    assert main(["compare", *TINY, "--weightings", "const", "opt", "--seeds", "0", "--epochs", "1",
                 "--weighting-arg", "update_every=2", "--out", str(out)]) == 2
    assert "update_every" in capsys.readouterr().err


def test_errors_are_one_line_and_name_the_problem(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "vgg", "--out", str(tmp_path)])
    assert "invalid choice: 'vgg'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--limit-train", "-5", "--out", str(tmp_path)])
    assert "expected a positive integer, got -5" in capsys.readouterr().err
    assert main([]) == 2  # no command: help


def test_cli_is_extensible():
    """Every command group is a module with add_parser(subparsers); all commands register."""
    assert "ann_kernels.train.commands" in COMMAND_MODULES
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "eval", "compare", "demo"} <= set(sub.choices)


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "ann_kernels", "eval", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--checkpoint" in res.stdout


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_demo_smoke_on_real_data(tmp_path, capsys):
    """The demo's code path on a sliver of real Fashion-MNIST (the full demo takes minutes)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit-train", "256", "--limit-eval", "200", "--epochs", "1",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "const acc %" in text and "adaloss acc %" in text and "demo wall time" in text
    assert "OPT reference (trained at the final exit only" in text
    assert (out / "anytime.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "adaloss-s0" / "weights.png").is_file()
