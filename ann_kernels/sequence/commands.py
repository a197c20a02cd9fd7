"""CLI group ``ann-kernels eann``: ``train`` (every member, then the evaluation) and ``eval``.

Example (the run in docs/results.md, ``scripts/reproduce_eann.sh``)::

    ann-kernels eann train --dataset fashion-mnist --members 3 --growth 2 --model resann \\
        --model-arg width=8 --num-exits 3 --epochs 2 --limit-train 15000 --batch-size 128 \\
        --lr 0.1 --channels-last --out runs/eann

writes ``OUT/member<j>/`` (one training run each), ``OUT/eann.json``, ``OUT/evaluation.json``,
``OUT/eann_anytime.png`` and ``OUT/report.md``; ``--results-md FILE`` also puts the report
in FILE between ``<!-- eann:begin -->`` / ``<!-- eann:end -->`` markers: replaced in place
if FILE has them (put them under your own heading), else appended under "## EANN"; other
content is left alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- eann:begin -->", "<!-- eann:end -->"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _command_line() -> str:
    return "ann-kernels " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _evaluate_and_report(run_dir: Path, *, split: str, limit: int | None, budgets, num_budgets: int,
                         results_md: str | None, command: str, data_dir: str | None = None,
                         progress: bool = True) -> int:
    from ann_kernels.sequence.evaluation import evaluate_eann, markdown_report, plot_eann
    from ann_kernels.sequence.training import load_eann
    from ann_kernels.train.runs import load_data

    t0 = time.perf_counter()
    model, manifest = load_eann(run_dir)
    data = load_data(manifest["members"][0]["spec"], data_dir=data_dir, limit_eval=limit)
    eval_set = {"test": data.test, "val": data.val}[split]
    calib_set = data.val if split == "test" else None
    budgets = [b * 1e6 for b in budgets] if budgets else None
    result = evaluate_eann(model, eval_set, calib_set, split=split, budgets=budgets, num_budgets=num_budgets,
                           progress=progress)
    (run_dir / "evaluation.json").write_text(json.dumps({"manifest": manifest, **result.to_dict()}, indent=1))
    plot = plot_eann(result, run_dir / "eann_anytime.png",
                     title=f"EANN x{len(result.member_flops)} ({manifest['weighting']})")
    report = markdown_report(result, manifest)
    (run_dir / "report.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {run_dir}/evaluation.json, {plot}, {run_dir}/report.md "
          f"(evaluation {time.perf_counter() - t0:.0f} s)")
    if results_md:
        _upsert_section(Path(results_md), _results_section(report, manifest, command, run_dir, split,
                                                            len(eval_set)))
        print(f"updated the EANN section of {results_md}")
    return 0


def _results_section(report: str, manifest: dict, command: str, run_dir: Path, split: str, n: int) -> str:
    spec = manifest["members"][0]["spec"]
    train_s = [s for s in manifest.get("train_seconds", []) if s is not None]
    fixed = {k: v for k, v in spec["model_kwargs"].items() if k != manifest["scale"]}
    lines = [
        f"Setup: {spec['dataset']}, {spec['model']} members grown in `{manifest['scale']}` "
        f"(values {manifest['values']}, other builder args {json.dumps(fixed)}), "
        f"growth target {manifest['growth']:g}, {manifest['epochs']} epochs per member on "
        f"{spec['limit_train'] or 'all'} training images, weighting `{manifest['weighting']}` "
        f"(per member: {', '.join(m['weighting'] for m in manifest['members'])}); "
        f"{split} split, {n:,} images; early-exit thresholds calibrated on the validation split "
        f"(held out of the training images)."
        + (f" Training took {sum(train_s) / 60:.1f} min of wall time in all." if train_s else ""),
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        (f"Plot: `{run_dir}/eann_anytime.png`. FLOPs are per sample (matmuls and convolutions, "
        "FlopCounterMode). B* is the smallest budget at which the best single member reaches "
        "the EANN's accuracy; inflation = B / B*."),
        "",
        report,
    ]
    return "\n".join(lines)


def _upsert_section(path: Path, section: str) -> None:
    block = f"{BEGIN}\n{section}\n{END}\n"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        tail = tail[1:] if tail.startswith("\n") else tail  # the block ends with that newline
        text = head + block + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + "## EANN\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cmd_train(args) -> int:
    from ann_kernels.sequence.training import train_eann
    from ann_kernels.train.commands import spec_kwargs_from_args, train_config_from_args
    from ann_kernels.train.runs import make_spec

    t0 = time.perf_counter()
    if args.growth <= 1:
        raise ValueError(f"growth: expected a cost ratio > 1 between consecutive members, got {args.growth}")
    spec = make_spec(weighting=args.weighting, seed=args.seed, **spec_kwargs_from_args(args))
    model = train_eann(spec, train_config_from_args(args), args.out, num_members=args.members,
                       growth=args.growth, scale=args.scale, start=args.start, resume=args.resume)
    print(f"trained {model.num_members} members into {args.out} in {time.perf_counter() - t0:.0f} s; "
          f"measured cost ratios {[round(r, 3) for r in model.build_info.cost_ratios]}")
    if args.no_eval:
        return 0
    return _evaluate_and_report(Path(args.out), split="test", limit=None, budgets=args.budgets,
                                num_budgets=args.num_budgets, results_md=args.results_md, command=_command_line(),
                                progress=args.progress)


def cmd_eval(args) -> int:
    return _evaluate_and_report(Path(args.run), split=args.split, limit=args.limit, budgets=args.budgets,
                                num_budgets=args.num_budgets, results_md=args.results_md,
                                command=_command_line(), data_dir=args.data_dir, progress=args.progress)


def _add_report_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--budgets", type=_positive_float, nargs="+", default=None, metavar="MFLOPS",
                   help="early-exit budgets in MFLOPs per sample (default: --num-budgets log-spaced ones)")
    g.add_argument("--num-budgets", type=int, default=6, help="number of default early-exit budgets")
    g.add_argument("--results-md", default=None, metavar="FILE",
                   help="also write the report into FILE between eann markers (e.g. docs/results.md)")


def add_parser(subparsers) -> None:
    """Register the ``eann`` group (``eann train``, ``eann eval``) on ``subparsers``."""
    from ann_kernels.train.commands import add_data_args, add_model_args, add_optim_args, positive_int

    group = subparsers.add_parser("eann", help="EANN: a sequence of anytime networks of growing cost",
                                  description="Train and evaluate an EANN (members of exponentially growing "
                                              "cost, run one after another).")
    sub = group.add_subparsers(dest="eann_command", metavar="SUBCOMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])

    p = sub.add_parser("train", help="train every member (AnytimeLoss), then evaluate the sequence",
                       description="Train the members of an EANN one after another (one run directory each), "
                                   "then evaluate it on the test split.")
    add_data_args(p)
    add_model_args(p)
    g = p.add_argument_group("sequence")
    g.add_argument("--members", type=positive_int, default=3, help="number of members M")
    g.add_argument("--growth", type=float, default=2.0, help="target cost ratio between consecutive members (> 1)")
    g.add_argument("--scale", default=None,
                   help="builder keyword grown per member (default: num_exits for resann / msdnet / mlp, "
                        "depth for transformer)")
    g.add_argument("--start", type=positive_int, default=None,
                   help="member 0's value of --scale (default: --num-exits / --model-arg / the builder's)")
    p.add_argument("--weighting", default="eann_sieve",
                   help="eann_sieve (member 0: sieve) or any AnytimeLoss scheme for every member, e.g. adaloss")
    add_optim_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="skip finished members, continue an interrupted one")
    p.add_argument("--no-eval", action="store_true", help="train only")
    _add_report_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="anytime curves, cost inflation and early exit of a trained EANN")
    p.add_argument("--run", required=True, help="a directory written by ann-kernels eann train")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluation split (early exit is calibrated on val, so only with test)")
    p.add_argument("--data-dir", default=None, help="override the data directory stored in the run")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N val / test images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_report_args(p)
    p.set_defaults(func=cmd_eval)
