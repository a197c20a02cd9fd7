"""Budgeted accuracy of every run of an ``ann-kernels compare`` directory.

For each run (``OUT/<weighting>-s<seed>/last.pt``) and each mean-FLOP budget: MSDNet
thresholds calibrated on the validation split (held out of training), then accuracy and
mean FLOPs on the test split with those thresholds. Writes ``OUT/budgeted.json``,
``OUT/budgeted.md`` (mean ± std over seeds, with each scheme's training time per run) and
``OUT/budgeted.png`` (test accuracy vs test mean FLOPs, one line per weighting, ±std band).
FLOPs are FLOPs (2 x multiply-accumulates), as ``MultiExitNetwork.exit_flops`` counts them.

    python scripts/budgeted_comparison.py runs/l2w --budgets 0.3 0.5 0.8 1.0

Budgets <= 1 are fractions of the full network's FLOPs per image. ``--also DIR LABEL``
adds the runs of another compare directory (same network and data), as column ``LABEL``
(e.g. a control run with another batch size).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ann_kernels.inference.calibration import simulate_thresholds
from ann_kernels.inference.commands import resolve_budget
from ann_kernels.inference.engine import EarlyExitEngine
from ann_kernels.train.metrics import read_jsonl
from ann_kernels.train.runs import load_data, load_trained


def evaluate_run(checkpoint: Path, budgets: list[float], data_cache: dict) -> dict:
    """Per budget: validation plan and test outcome of one trained run."""
    model, spec, _ = load_trained(checkpoint)
    key = (spec["dataset"], spec.get("limit_eval"), spec.get("val_size"))
    if key not in data_cache:
        data_cache[key] = load_data(spec)
    data = data_cache[key]
    engine = EarlyExitEngine(model)
    val = engine.calibrate(data.val)  # thresholds come from here only
    test = engine.exit_outputs(data.test)
    flops = val.exit_flops
    full = float(flops[-1])
    rows = []
    for b in budgets:
        budget = max(resolve_budget(b, full), float(flops[0]))
        plan = engine.calibrate_budget(budget)
        acc, cost, counts = simulate_thresholds(test.confidence, test.correct, flops, plan.thresholds)
        rows.append({"budget_rel": budget / full, "val_acc": plan.accuracy, "test_acc": float(acc),
                     "test_flops": float(cost), "test_rel": float(cost) / full, "exit_counts": counts.tolist()})
    history = read_jsonl(checkpoint.parent / "metrics.jsonl") if (checkpoint.parent / "metrics.jsonl").is_file() else []
    return {"exit_flops": flops.tolist(), "exit_test_acc": test.correct.double().mean(dim=1).tolist(),
            "budgets": rows, "train_time_s": sum(float(r.get("train_time_s", 0.0)) for r in history)}


def _ms(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="an ann-kernels compare output directory")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
    p.add_argument("--also", nargs=2, action="append", default=[], metavar=("DIR", "LABEL"),
                   help="another compare directory whose runs join the table as column LABEL")
    args = p.parse_args(argv)
    summary = json.loads((args.out / "summary.json").read_text())
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict]] = {}
    cache: dict = {}
    runs = [(w, s, r) for w, by_seed in summary["runs"].items() for s, r in by_seed.items()]
    for other, label in args.also:
        other_runs = json.loads((Path(other) / "summary.json").read_text())["runs"]
        runs += [(label if len(other_runs) == 1 else f"{w} {label}", s, r)
                 for w, by_seed in other_runs.items() for s, r in by_seed.items()]
    for weighting, seed, run in tqdm(runs, desc="calibrate + test"):
        results.setdefault(weighting, {})[seed] = evaluate_run(Path(run["dir"]) / "last.pt", args.budgets, cache)
    (args.out / "budgeted.json").write_text(json.dumps(results, indent=1))

    weightings = list(results)
    first = next(iter(results[weightings[0]].values()))
    full = first["exit_flops"][-1]
    lines = ["| budget (rel. FLOPs) | " + " | ".join(f"{w} test acc % (rel. FLOPs)" for w in weightings) + " |",
             "|---|" + "---|" * len(weightings)]
    for i, b in enumerate(args.budgets):
        cells = []
        for w in weightings:
            rows = [r["budgets"][i] for r in results[w].values()]
            cells.append(f"{_ms([r['test_acc'] for r in rows])} ({statistics.fmean(r['test_rel'] for r in rows):.2f})")
        lines.append(f"| {first['budgets'][i]['budget_rel']:.2f} | " + " | ".join(cells) + " |")
    lines.append("| single exits, mean (first / last) | " + " | ".join(
        f"{_ms([statistics.fmean(r['exit_test_acc']) for r in results[w].values()])} "
        f"({_ms([r['exit_test_acc'][0] for r in results[w].values()])} / "
        f"{_ms([r['exit_test_acc'][-1] for r in results[w].values()])})" for w in weightings) + " |")
    lines.append("| training wall time per run, s (1 thread, shared CPU) | " + " | ".join(
        f"{statistics.fmean(r.get('train_time_s', 0.0) for r in results[w].values()):.0f}" for w in weightings) + " |")
    table = "\n".join(lines)
    (args.out / "budgeted.md").write_text(table + "\n")
    print(f"full network: {full / 1e6:.3f} MFLOPs per image; {len(next(iter(results.values())))} seeds")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for w in weightings:
        per_seed = list(results[w].values())
        x = torch.tensor([[r["test_flops"] / 1e6 for r in s["budgets"]] for s in per_seed]).mean(0)
        y = torch.tensor([[100 * r["test_acc"] for r in s["budgets"]] for s in per_seed])
        line, = ax.plot(x, y.mean(0), "o-", label=w)
        if y.shape[0] > 1:
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("mean MFLOPs per test image (FLOPs = 2 x MACs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Budgeted early exit (thresholds from the validation split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "budgeted.png", dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}/budgeted.json, budgeted.md, budgeted.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
