"""Compare weighting schemes: the same network, data, budget and seeds, one run per
(weighting, seed); then one per-exit table (test accuracy, mean ± std over seeds, and the
cumulative FLOPs of each exit) and one anytime plot.

Output layout under ``out``::

    out/<weighting>-s<seed>/{last.pt, metrics.jsonl, anytime.png, weights.png}
    out/summary.json      per-exit FLOPs and final val / test accuracies of every run
    out/table.md          the table, markdown
    out/anytime.png       accuracy vs cumulative FLOPs, one line per weighting (±std band), OPT as a
                          point at its final exit, AdaLoss - CONST per exit below

``ann-kernels demo`` is this with the demo's preset (CONST vs AdaLoss, one seed);
``scripts/reproduce_results.sh`` is this with several seeds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ann_kernels.train.metrics import exit_table, read_jsonl
from ann_kernels.train.plots import plot_anytime
from ann_kernels.train.runs import build_trainer, load_data, make_spec, run_dir_status
from ann_kernels.train.trainer import TrainConfig


def _run_one(spec: dict, config: dict, run_dir: str, resume: bool, label: str, threads: int | None) -> None:
    """One (weighting, seed) run; also the entry point of a worker process."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    build_trainer(spec, TrainConfig.from_dict(config), run_dir, resume=resume, label=label).fit()


def run_comparison(
    out: str | os.PathLike,
    *,
    weightings: Sequence[str] = ("const", "adaloss"),
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    resume: bool = True,
    jobs: int = 1,
    title: str | None = None,
    **spec_kwargs,
) -> dict:
    """Train every (weighting, seed) (skipping runs already complete in ``out`` when
    ``resume``), write summary.json / table.md / anytime.png, and return the summary dict.
    ``spec_kwargs`` go to :func:`~ann_kernels.train.runs.make_spec` (dataset, model,
    limit_train, model_kwargs, ...). ``config.seed`` is replaced by each seed.

    ``jobs > 1`` trains that many runs at a time in worker processes with
    ``cpu_count // jobs`` threads each: on a 2-core CPU two 1-thread runs side by side
    finish sooner than two 2-thread runs one after the other (small convolutions scale
    badly across threads, and very badly when other processes load the CPU).
    """
    if not weightings:
        raise ValueError("weightings: expected at least one weighting scheme")
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    if jobs < 1:
        raise ValueError(f"jobs: expected >= 1 parallel runs, got {jobs}")
    base = config or TrainConfig()
    per_weighting_kwargs = split_weighting_kwargs(weightings, spec_kwargs.pop("weighting_kwargs", None) or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo, dirs = [], {}
    for weighting in weightings:
        for seed in seeds:
            cfg = {**base.__dict__, "seed": seed}
            spec = make_spec(weighting=weighting, seed=seed, weighting_kwargs=per_weighting_kwargs[weighting],
                             **spec_kwargs)
            run_dir = out / f"{weighting}-s{seed}"
            dirs[weighting, seed] = run_dir
            status = run_dir_status(run_dir, TrainConfig.from_dict(cfg), spec) if resume else "missing"
            if status == "complete":
                tqdm.write(f"[{weighting} s{seed}] already complete in {run_dir}, reusing it")
                continue
            if status == "different":
                tqdm.write(f"[{weighting} s{seed}] {run_dir} was trained with other settings; retraining it")
            todo.append((spec, cfg, str(run_dir), status == "partial", f"{weighting} s{seed}"))
    if jobs == 1 or len(todo) <= 1:
        data_cache: dict = {}
        for spec, cfg, run_dir, resume_run, label in todo:
            # Real data does not depend on the seed; synthetic data does.
            key = spec["seed"] if spec["dataset"] == "synthetic" else None
            if key not in data_cache:
                data_cache[key] = load_data(spec)
            build_trainer(spec, TrainConfig.from_dict(cfg), run_dir, resume=resume_run, data=data_cache[key],
                          label=label).fit()
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_run_one, spec, {**cfg, "progress_position": i % jobs}, run_dir, resume_run,
                                   label, threads)
                       for i, (spec, cfg, run_dir, resume_run, label) in enumerate(todo)]
            for f in futures:
                f.result()  # re-raises a worker's exception
    runs: dict[str, dict[int, dict]] = {}
    for (weighting, seed), run_dir in dirs.items():
        last = read_jsonl(run_dir / "metrics.jsonl")[-1]
        runs.setdefault(weighting, {})[seed] = {
            "test_acc": last.get("test_acc"), "val_acc": last.get("val_acc"),
            "exit_flops": last["exit_flops"], "epochs": last["epoch"], "dir": str(run_dir),
            "train_time_s": sum(r["time_s"] for r in read_jsonl(run_dir / "metrics.jsonl")),
        }
    flops = next(iter(next(iter(runs.values())).values()))["exit_flops"]
    summary = {
        "spec": {k: v for k, v in make_spec(weighting="-", **spec_kwargs).items() if k not in ("weighting", "seed")},
        "config": {k: v for k, v in base.__dict__.items() if k not in ("seed", "progress", "progress_position")},
        "jobs": jobs,
        "weightings": list(weightings),
        "weighting_kwargs": per_weighting_kwargs,
        "seeds": list(seeds),
        "exit_flops": flops,
        "runs": {w: {str(s): r for s, r in by_seed.items()} for w, by_seed in runs.items()},
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = summary_table(summary, markdown=True)
    (out / "table.md").write_text(table + "\n")
    plot_anytime(**anytime_plot_inputs(summary), path=out / "anytime.png",
                 title=title or f"{spec_kwargs.get('model', 'resann')} on "
                                f"{spec_kwargs.get('dataset', 'fashion-mnist')}: test accuracy per exit")
    return summary


def anytime_plot_inputs(summary: dict, *, split: str = "test") -> dict:
    """The ``runs`` / ``references`` / ``delta`` arguments of :func:`plot_anytime` for a
    :func:`run_comparison` summary. OPT trains the final exit only: its earlier exits are untrained
    (a few % accuracy) and would squash the curves that matter into one line, so an ``opt`` run is a
    reference point at its final exit (a curve only when it is the sole run); the difference panel
    shows AdaLoss - CONST per exit."""
    flops = summary["exit_flops"]
    acc = {w: [r[f"{split}_acc"] for r in by_seed.values()] for w, by_seed in summary["runs"].items()}
    curves = {w: (flops, a) for w, a in acc.items() if w != "opt"} or {"opt": (flops, acc["opt"])}
    references = None
    if "opt" in acc and "opt" not in curves:
        references = {"OPT (final exit only)": (flops[-1], [a[-1] for a in acc["opt"]])}
    return {"runs": curves, "references": references, "delta": ("const", "adaloss")}


def split_weighting_kwargs(weightings: Sequence[str], weighting_kwargs: dict) -> dict[str, dict]:
    """``{weighting: the options of weighting_kwargs that scheme accepts}``; an option no
    listed scheme accepts is an error (a typo would otherwise be dropped silently)."""
    from ann_kernels.losses.schemes import weighting_options

    out, used = {}, set()
    for w in weightings:
        accepted = weighting_options(w)
        out[w] = {k: v for k, v in weighting_kwargs.items() if accepted is None or k in accepted}
        used |= set(out[w])
    unused = sorted(set(weighting_kwargs) - used)
    if unused:
        raise ValueError(f"weighting_kwargs: {unused} are options of none of the schemes {list(weightings)}")
    return out


def summary_table(summary: dict, *, markdown: bool = False, split: str = "test") -> str:
    """Per-exit table of a :func:`run_comparison` summary: cumulative FLOPs per image (every
    stage and head up to the exit; FLOPs = 2 x MACs) and, per weighting, the {split} accuracy
    (mean ± std over seeds), plus AdaLoss - CONST when both are there. An ``opt`` run (OPT:
    trained at the final exit only) is not a column: its early exits are untrained; it is
    the reference line under the table (its final-exit accuracy and each scheme's gap to it)."""
    from ann_kernels.train.metrics import mean_std

    runs = summary["runs"]
    columns = {w: [r[f"{split}_acc"] for r in by_seed.values()] for w, by_seed in runs.items() if w != "opt"}
    delta = ("const", "adaloss") if "const" in columns and "adaloss" in columns else None
    lines = [exit_table(summary["exit_flops"], columns, markdown=markdown, delta=delta)] if columns else []
    if "opt" in runs:
        finals = [r[f"{split}_acc"][-1] for r in runs["opt"].values()]
        m, sd = mean_std(finals)
        n = len(finals)
        gaps = ", ".join(f"{w} {100 * (mean_std([r[-1] for r in col])[0] - m):+.2f}" for w, col in columns.items())
        lines.append(f"OPT reference (trained at the final exit only, {n} seed{'s' if n > 1 else ''}): final-exit "
                     f"{split} acc {100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "") + " %"
                     + (f"; final exit minus OPT: {gaps}" if gaps else ""))
    lines.append("FLOPs: per image, every stage and every head up to the exit (FlopCounterMode; FLOPs = 2 x MACs).")
    return ("\n\n" if markdown else "\n").join(lines)
