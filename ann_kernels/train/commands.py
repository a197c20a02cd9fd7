"""CLI commands of the training package: ``train``, ``eval``, ``compare`` and ``demo``.

``add_parser(subparsers)`` registers them on the top-level ``ann-kernels`` parser
(:mod:`ann_kernels.cli`); each command's function takes the parsed ``argparse.Namespace``
and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ann_kernels.train.data import DEFAULT_VAL_SIZE

DEMO_MODEL_KWARGS = {"num_exits": 6, "width": 16}
# Measured on this 2-core CPU with other work running (load ~3): ~60 s per epoch per run,
# two runs side by side; three runs (CONST, AdaLoss, OPT) x 3 epochs -> about 5.5 minutes
# in all (the limit is 10).
DEMO_LIMIT_TRAIN = None  # the whole 55,000-image training split
DEMO_LIMIT_EVAL = None
DEMO_EPOCHS = 3
DEMO_BATCH_SIZE = 128
DEMO_LR = 0.1


def _key_value(text: str) -> tuple[str, object]:
    """``"width=8"`` -> ``("width", 8)``; values are parsed as JSON when they can be."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def positive_int(text: str) -> int:
    """argparse ``type=``: ``"3"`` -> 3; zero, negatives and non-integers are a usage error
    naming the text."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_data_args(p: argparse.ArgumentParser, *, dataset_default: str = "fashion-mnist") -> None:
    """The ``data`` argument group (``--dataset``, ``--data-dir``, ``--limit-*``, ``--val-size``), shared by
    ``train``, ``compare`` and ``eann train``."""
    from ann_kernels.train.runs import DATASET_CHOICES

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=(*DATASET_CHOICES, "text"), default=dataset_default,
                   help="text: an early-exit language model (ann_kernels/train/lm.py)")
    g.add_argument("--data-dir", default=None,
                   help="directory with the IDX files (default: $ANN_DATA, else /usr/share/datasets/<dataset>)")
    g.add_argument("--limit-train", type=positive_int, default=None,
                   help="use only the first N training images")
    g.add_argument("--limit-eval", type=positive_int, default=None,
                   help="use only the first N validation and test images")
    g.add_argument("--val-size", type=positive_int, default=DEFAULT_VAL_SIZE,
                   help="images held out of the training set for validation / calibration")


def add_optim_args(p: argparse.ArgumentParser, *, epochs: int = 3, batch_size: int = 128, lr=None) -> None:
    """The ``optimisation`` argument group (what :func:`train_config_from_args` reads)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs)
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help="per process")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: 0.05 SGD, 2e-3 AdamW)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain SGD momentum")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 SGD, 0.05 AdamW")
    g.add_argument("--weight-decay-mode", choices=("all", "reference"), default="all",
                   help="all: every parameter; reference: the original AdaLoss code's (conv and FC weights, "
                        "FC decay times the exit's static weight, no decay on BN)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    g.add_argument("--channels-last", action="store_true", help="NHWC activations (faster CPU convolutions)")
    g.add_argument("--gradient-equilibrium", action="store_true",
                   help="IMTA's gradient equilibrium between stages (any weighting; implied by --weighting ge)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_model_args(p: argparse.ArgumentParser, *, model_args=None) -> None:
    """The ``model`` argument group (what :func:`spec_kwargs_from_args` reads)."""
    from ann_kernels.train.runs import MODELS

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="resann")
    g.add_argument("--num-exits", type=positive_int, default=None,
                   help="number of exits (transformer: depth); default: the builder's")
    g.add_argument("--model-arg", action="append", type=_key_value, default=model_args or [], metavar="KEY=VALUE",
                   help="extra builder argument, e.g. --model-arg width=8 (repeatable)")
    g.add_argument("--weighting-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="extra weighting-scheme argument, e.g. --weighting-arg momentum=0.9 (repeatable)")


def train_config_from_args(args):
    """The :class:`~ann_kernels.train.trainer.TrainConfig` of a namespace parsed with
    :func:`add_optim_args`."""
    from ann_kernels.train.trainer import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                       weight_decay_mode=getattr(args, "weight_decay_mode", "all"),
                       warmup_steps=args.warmup_steps, bf16=args.bf16, channels_last=args.channels_last, seed=getattr(args, "seed", 0),
                       gradient_equilibrium=getattr(args, "gradient_equilibrium", False),
                       progress=args.progress)


def spec_kwargs_from_args(args) -> dict:
    """``make_spec`` keywords (data, model, weighting arguments) of a namespace parsed with
    :func:`add_data_args` and :func:`add_model_args`."""
    model_kwargs = dict(args.model_arg)
    if args.num_exits is not None:
        model_kwargs["depth" if args.model == "transformer" else "num_exits"] = args.num_exits
    return dict(dataset=args.dataset, model=args.model, data_dir=args.data_dir, limit_train=args.limit_train,
                limit_eval=args.limit_eval, val_size=args.val_size, model_kwargs=model_kwargs,
                weighting_kwargs=dict(args.weighting_arg), label_smoothing=args.label_smoothing)


# ---------------------------------------------------------------- train


def _train_worker(rank: int, world_size: int, spec: dict, config_dict: dict, out: str, resume: bool,
                  until_epoch: int | None = None) -> None:
    from ann_kernels.train.runs import build_trainer
    from ann_kernels.train.trainer import TrainConfig

    cfg = TrainConfig.from_dict(config_dict)
    cfg.progress = cfg.progress and rank == 0
    build_trainer(spec, cfg, out, resume=resume).fit(until_epoch=until_epoch)


def cmd_train(args) -> int:
    from ann_kernels.train.distributed import exit_process, init_from_env, launch, leave_process_group

    group = init_from_env()  # torchrun: this process is one rank of an external group
    if group is not None and args.nproc > 1:
        raise ValueError(f"--nproc: {args.nproc} processes requested inside a torchrun group of {group[1]}; "
                         "use one or the other")
    if group is None:
        return _run_train(args, group, launch)
    try:
        code = _run_train(args, group, launch)
    except BaseException:
        import torch.distributed as dist

        dist.destroy_process_group()
        raise
    leave_process_group()
    exit_process(code)  # see exit_process: a gloo thread may otherwise abort the exit


def _run_train(args, group, launch) -> int:
    from ann_kernels.train.metrics import exit_table, read_jsonl
    from ann_kernels.train.runs import make_spec

    if args.dataset == "text":  # early-exit language model (issues 11, 23)
        from ann_kernels.train.lm import cmd_train_lm

        return cmd_train_lm(args)

    t0 = time.perf_counter()
    spec = make_spec(weighting=args.weighting, seed=args.seed, **spec_kwargs_from_args(args))
    cfg = train_config_from_args(args)
    if args.nproc > 1:
        launch(_train_worker, args.nproc, spec, cfg.__dict__, str(args.out), args.resume, args.stop_after_epoch)
    elif group is not None:  # one rank of torchrun's group; rank 0 reports
        _train_worker(group[0], group[1], spec, cfg.__dict__, str(args.out), args.resume, args.stop_after_epoch)
        if group[0] != 0:
            return 0
    else:
        _train_worker(0, 1, spec, cfg.__dict__, str(args.out), args.resume, args.stop_after_epoch)
    last = read_jsonl(Path(args.out) / "metrics.jsonl")[-1]
    cols = {f"{s} ({args.weighting})": last[f"{s}_acc"] for s in ("val", "test") if f"{s}_acc" in last}
    print(exit_table(last["exit_flops"], cols))
    print(f"wrote {args.out}/last.pt, metrics.jsonl, anytime.png, weights.png in {time.perf_counter() - t0:.0f} s")
    return 0


# ---------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from ann_kernels.train.metrics import collect_exit_outputs, format_flops
    from ann_kernels.train.runs import load_data, load_trained
    from ann_kernels.train.lm import cmd_eval_lm, is_lm_checkpoint

    if is_lm_checkpoint(args.checkpoint):  # early-exit language model (issue 11)
        return cmd_eval_lm(args)
    model, spec, ckpt = load_trained(args.checkpoint)
    data = load_data(spec, data_dir=args.data_dir, limit_eval=args.limit)
    dataset = {"test": data.test, "val": data.val, "train": data.train}[args.split]
    out = collect_exit_outputs(model, dataset, batch_size=args.batch_size)
    flops = ckpt.get("exit_flops") or [float(f) for f in model.exit_flops(dataset[0][0].unsqueeze(0))]
    acc, loss = out.accuracy.tolist(), out.mean_loss.tolist()
    conf = out.confidence.double().mean(dim=1).tolist()
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, "n": len(out.target),
                          "exit_flops": flops, "acc": acc, "loss": loss, "mean_confidence": conf}))
        return 0
    print(f"{args.checkpoint}: {spec['model']} trained {ckpt['epoch']} epochs on {spec['dataset']} "
          f"with {spec['weighting']}; {args.split} split, {len(out.target)} images")
    header = f"{'exit':>4}  {'FLOPs':>8}  {'rel. cost':>9}  {'acc %':>6}  {'loss':>6}  {'mean conf':>9}"
    print(header)
    print("-" * len(header))
    for k in range(len(acc)):
        print(f"{k + 1:>4}  {format_flops(flops[k]):>8}  {flops[k] / flops[-1]:>9.2f}  {100 * acc[k]:>6.2f}  "
              f"{loss[k]:>6.3f}  {conf[k]:>9.3f}")
    return 0


# ---------------------------------------------------------------- compare / demo


def cmd_compare(args) -> int:
    from ann_kernels.train.compare import run_comparison, summary_table

    t0 = time.perf_counter()
    summary = run_comparison(args.out, weightings=args.weightings, seeds=args.seeds,
                             config=train_config_from_args(args),
                             resume=not args.restart, jobs=args.jobs, **spec_kwargs_from_args(args))
    print(summary_table(summary))
    print(f"wrote {args.out}/summary.json, table.md, anytime.png; wall time {time.perf_counter() - t0:.0f} s")
    return 0


DEMO_WEIGHTINGS = ["const", "adaloss", "opt"]


def cmd_demo(args) -> int:
    """CONST vs the reference AdaLoss on real Fashion-MNIST, same ResANN, seed and budget,
    with OPT (trained at the final exit only) as the reference line."""
    from ann_kernels.train.compare import run_comparison, summary_table

    if getattr(args, "lm", False):  # early-exit language model demo (issue 11)
        from ann_kernels.train.lm import demo_lm

        return demo_lm(args)

    t0 = time.perf_counter()
    n_train = f"{args.limit_train:,}" if args.limit_train else "all 55,000"
    print(f"demo: ResANN {DEMO_MODEL_KWARGS} on Fashion-MNIST, {n_train} training images x "
          f"{args.epochs} epochs, CONST vs AdaLoss (the original's defaults) and OPT at the final exit "
          f"(seed {args.seed}, {args.jobs} runs at a time); "
          f"output in {args.out}/", flush=True)
    args.seeds, args.weightings = [args.seed], list(DEMO_WEIGHTINGS)
    args.dataset, args.model, args.num_exits, args.model_arg = "fashion-mnist", "resann", None, []
    args.val_size, args.weighting_arg, args.label_smoothing = DEFAULT_VAL_SIZE, [], 0.0
    spec_kwargs = spec_kwargs_from_args(args)
    spec_kwargs["model_kwargs"] = dict(DEMO_MODEL_KWARGS)
    summary = run_comparison(args.out, weightings=args.weightings, seeds=args.seeds,
                             config=train_config_from_args(args),
                             resume=args.resume, jobs=args.jobs, **spec_kwargs)
    n_test = 10000 if args.limit_eval is None else min(args.limit_eval, 10000)
    print()
    print(f"Per-exit test accuracy ({n_test:,} Fashion-MNIST test images) and cumulative cost per image:")
    print(summary_table(summary))
    print(f"\nanytime plot: {args.out}/anytime.png   AdaLoss weights: {args.out}/adaloss-s{args.seed}/weights.png")
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return 0


# ---------------------------------------------------------------- registration


def add_parser(subparsers) -> None:
    """Register ``train``, ``eval``, ``compare`` and ``demo`` on ``subparsers``."""
    p = subparsers.add_parser("train", help="train an anytime network (one weighting scheme)",
                              description="Train a multi-exit network; writes last.pt, metrics.jsonl and PNGs "
                                          "to --out.")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--weighting", default="adaloss",
                   help="loss weighting: adaloss, const, linear, half_end, sieve, eann_sieve, oscillating, opt, "
                        "l2w (L2W-DEN, SGD only), sdn, imta_kd, ge")
    add_optim_args(p)
    from ann_kernels.train.text import add_text_args

    add_text_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="data-parallel processes (DDP, gloo); or launch with torchrun --nproc-per-node N -m ann_kernels")
    p.add_argument("--stop-after-epoch", type=positive_int, default=None, metavar="E",
                   help="stop after epoch E of the --epochs schedule (continue later with --resume)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="per-exit accuracy and cost of a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="a last.pt written by train")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--data-dir", default=None, help="override the data directory stored in the checkpoint")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("compare", help="train several weightings x seeds, one table and plot",
                              description="Same network, data and budget for every weighting and seed; writes "
                                          "OUT/summary.json, OUT/table.md and OUT/anytime.png.")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--weightings", nargs="+", default=["const", "adaloss"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    add_optim_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--restart", action="store_true", help="retrain runs already complete in OUT")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained at a time, in worker processes (2 on a 2-core CPU is fastest)")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("demo", help="the main job: CONST vs AdaLoss (and OPT) on Fashion-MNIST (< 10 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=positive_int, default=DEMO_LIMIT_TRAIN)
    p.add_argument("--limit-eval", type=positive_int, default=DEMO_LIMIT_EVAL)
    add_optim_args(p, epochs=DEMO_EPOCHS, batch_size=DEMO_BATCH_SIZE, lr=DEMO_LR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="reuse complete runs in OUT instead of retraining")
    p.add_argument("--jobs", type=positive_int, default=2, help="runs trained at a time (worker processes)")
    p.add_argument("--lm", action="store_true",
                   help="instead: a short early-exit language model on the CPython stdlib (output OUT-lm/)")
    p.set_defaults(func=cmd_demo, channels_last=True)
