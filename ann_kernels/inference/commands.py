"""CLI commands ``calibrate``, ``infer`` and ``serve`` (registered in :mod:`ann_kernels.cli`).

- ``ann-kernels calibrate --checkpoint runs/x/last.pt --budgets 0.3 0.5 0.8``: thresholds
  from the validation split (held out of training) for each budget, the accuracy-budget
  table on the test split, ``budgeted.png`` (test accuracy vs mean FLOPs, with every
  single exit for reference) and ``calibration.json``.
- ``ann-kernels infer --checkpoint runs/x/last.pt --budget 0.5``: real early exit with
  :class:`~ann_kernels.EarlyExitEngine` on the test split: accuracy, mean FLOPs and measured
  throughput against the full network (all stages + the last head) on the same batches.
- ``ann-kernels serve --checkpoint runs/x/last.pt --port 8000 [--budget B]``: an HTTP
  endpoint (:mod:`ann_kernels.serve`: ``/predict``, the Open Inference Protocol ``/v2``,
  ``/metrics``; FastAPI + uvicorn, extra ``[serve]``) over an
  :class:`~ann_kernels.inference.EarlyExitServer`; with ``--budget`` the thresholds are
  calibrated on the validation split first, without it every request runs at full depth.
  SIGTERM drains (``--drain-timeout-s``); ``--backend ray --replicas N`` runs N replicas on a
  local Ray Serve instance (extra ``[ray]``). See ``docs/serving.md``. On an LM checkpoint
  (``ann-kernels train --dataset text``) it serves the OpenAI ``/v1/completions`` over a
  :class:`~ann_kernels.generation.GenerationServer` instead (``--mode``, ``--exit-index``,
  ``--threshold``, ``--draft-len``; ``--backend ray --replicas N`` too; :mod:`ann_kernels.serve.lm_command`,
  ``docs/serving_lm.md``).

Budgets: a value <= 1 is a fraction of the full network's FLOPs per sample, a value > 1 is
FLOPs per sample. The model is rebuilt with :func:`ann_kernels.train.runs.load_trained`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

__all__ = ["add_parser", "cmd_calibrate", "cmd_infer", "cmd_serve", "resolve_budget"]


def resolve_budget(value: float, full_flops: float) -> float:
    """FLOPs per sample of a CLI budget (<= 1: a fraction of the full network)."""
    if not value > 0:
        raise ValueError(f"budget: expected a positive fraction or FLOP count, got {value}")
    return value * full_flops if value <= 1.0 else value


def _load(args):
    from ann_kernels.inference.engine import EarlyExitEngine
    from ann_kernels.train.runs import load_data, load_trained

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, spec, _ = load_trained(args.checkpoint)
    data = load_data(spec, data_dir=args.data_dir, limit_eval=args.limit)
    return EarlyExitEngine(model, criterion=args.criterion), spec, data


def cmd_calibrate(args) -> int:
    from ann_kernels.inference.calibration import simulate_thresholds

    engine, spec, data = _load(args)
    val = engine.calibrate(data.val, batch_size=args.batch_size)  # thresholds come from here
    test = engine.exit_outputs(data.test, batch_size=args.batch_size)  # only evaluated
    flops = val.exit_flops
    full = float(flops[-1])
    budgets = (
        [resolve_budget(b, full) for b in args.budgets]
        if args.budgets
        else torch.linspace(float(flops[0]), full, 8).tolist()
    )
    rows = []
    for budget in budgets:
        planned = engine.calibrate_budget(budget)
        accuracy, cost, counts = simulate_thresholds(test.confidence, test.correct, flops, planned.thresholds)
        rows.append(
            {
                "budget": budget,
                "thresholds": planned.thresholds.tolist(),
                "val_acc": planned.accuracy,
                "val_flops": planned.mean_flops,
                "test_acc": float(accuracy),
                "test_flops": float(cost),
                "test_exit_counts": counts.tolist(),
            }
        )
    exit_acc = test.correct.double().mean(dim=1).tolist()

    print(
        f"{args.checkpoint}: {spec['model']} on {spec['dataset']}; criterion {engine.criterion}; thresholds "
        f"from {val.confidence.shape[1]} validation images, accuracy on {test.confidence.shape[1]} test images"
    )
    header = (
        f"{'budget MFLOPs':>13} {'rel':>5}  {'val acc %':>9} {'test acc %':>10} {'test MFLOPs':>11} "
        f"{'rel':>5}  exits (test)"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['budget'] / 1e6:>13.3f} {r['budget'] / full:>5.2f}  {100 * r['val_acc']:>9.2f} "
            f"{100 * r['test_acc']:>10.2f} {r['test_flops'] / 1e6:>11.3f} {r['test_flops'] / full:>5.2f}  "
            f"{r['test_exit_counts']}"
        )
    print(
        "single exits (test): "
        + ", ".join(
            f"exit {k}: {100 * a:.2f}% @ {float(f) / 1e6:.3f} MFLOPs"
            for k, (a, f) in enumerate(zip(exit_acc, flops))
        )
    )
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "criterion": engine.criterion,
                "exit_flops": flops.tolist(),
                "exit_test_accuracy": exit_acc,
                "budgets": rows,
            },
            indent=2,
            default=float,
        )
    )
    png = _plot(rows, exit_acc, flops.tolist(), out / "budgeted.png", f"{spec['model']} on {spec['dataset']}")
    print(f"wrote {out / 'calibration.json'} and {png}")
    return 0


def _plot(rows, exit_acc, exit_flops, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["test_flops"] / 1e6 for r in rows],
        [100 * r["test_acc"] for r in rows],
        "o-",
        label="budgeted early exit (test)",
    )
    ax.plot(
        [f / 1e6 for f in exit_flops],
        [100 * a for a in exit_acc],
        "s--",
        alpha=0.7,
        label="single exit k (test)",
    )
    ax.set_xlabel("mean MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Budgeted accuracy: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _full_network(model, x):
    h = x
    for k in range(model.num_exits):
        h = model.forward_stage(k, h)
    return model.forward_head(model.num_exits - 1, h)


def cmd_infer(args) -> int:
    engine, spec, data = _load(args)
    engine.calibrate(data.val, batch_size=args.batch_size)
    full = float(engine.calibration.exit_flops[-1])
    budget = resolve_budget(args.budget, full)
    planned = engine.calibrate_budget(budget)
    x_all, y_all = data.test.tensors
    batches = list(torch.split(x_all, args.batch_size))
    n = x_all.shape[0]
    with torch.inference_mode():
        for _ in range(args.warmup):  # first calls allocate, measure FLOPs, warm caches
            engine.predict(batches[0], thresholds=planned.thresholds)
            _full_network(engine.model, batches[0])
        start = time.perf_counter()
        if args.stream:
            results = list(engine.stream(batches, thresholds=planned.thresholds))
        else:
            results = [engine.predict(xb, thresholds=planned.thresholds) for xb in batches]
        early_seconds = time.perf_counter() - start
        start = time.perf_counter()
        full_predictions = [_full_network(engine.model, xb).argmax(dim=1) for xb in batches]
        full_seconds = time.perf_counter() - start
    prediction = torch.cat([r.prediction for r in results])
    exits = torch.cat([r.exit_index for r in results])
    accuracy = float((prediction == y_all).double().mean())
    full_accuracy = float((torch.cat(full_predictions) == y_all).double().mean())
    counts = torch.bincount(exits, minlength=engine.num_exits).tolist()
    mean_flops = sum(r.stats.mean_flops * r.prediction.shape[0] for r in results) / n
    executed = sum(r.stats.executed_flops * r.prediction.shape[0] for r in results) / n
    mode = "stream (queue per stage)" if args.stream else "predict per batch"
    print(
        f"{args.checkpoint}: {spec['model']} on {spec['dataset']} test split ({n} images, batch "
        f"{args.batch_size}, {torch.get_num_threads()} thread(s), {mode}); criterion {engine.criterion}"
    )
    print(
        f"budget {budget / 1e6:.3f} MFLOPs/image ({budget / full:.2f} of the full network); validation "
        f"plan: {100 * planned.accuracy:.2f}% at {planned.mean_flops / 1e6:.3f} MFLOPs"
    )
    print(
        f"early exit : accuracy {100 * accuracy:6.2f}%  mean {mean_flops / 1e6:8.3f} MFLOPs/image "
        f"({mean_flops / full:.2f} of full; {executed / 1e6:.3f} executed incl. intermediate heads)  "
        f"{n / early_seconds:10.1f} images/s"
    )
    print(
        f"full net   : accuracy {100 * full_accuracy:6.2f}%  mean {full / 1e6:8.3f} MFLOPs/image "
        f"(1.00)  {n / full_seconds:10.1f} images/s"
    )
    print(
        f"speedup {full_seconds / early_seconds:.2f}x measured, {full / mean_flops:.2f}x in FLOPs; "
        f"exits per stage {counts}"
    )
    return 0


def build_server(args):
    """(EarlyExitServer, spec) for ``serve``'s arguments (not started)."""
    from ann_kernels.inference.engine import EarlyExitEngine
    from ann_kernels.inference.server import EarlyExitServer
    from ann_kernels.train.runs import load_data, load_trained

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, spec, _ = load_trained(args.checkpoint)
    engine = EarlyExitEngine(model, criterion=args.criterion)
    thresholds = None
    if args.budget is not None:
        data = load_data(spec, data_dir=args.data_dir, limit_eval=args.limit)
        engine.calibrate(data.val, batch_size=args.batch_size)
        budget = resolve_budget(args.budget, float(engine.calibration.exit_flops[-1]))
        thresholds = engine.calibrate_budget(budget).thresholds
    if args.max_wait_ms < 0:
        raise ValueError(f"max-wait-ms: expected milliseconds >= 0, got {args.max_wait_ms}")
    server = EarlyExitServer(engine, thresholds=thresholds, max_batch_size=args.max_batch_size or 256,
                             max_wait_s=args.max_wait_ms / 1e3, sample_shape=tuple(spec["input_shape"]))
    return server, spec


def model_name_of(args) -> str:
    """``--model-name``, default the run directory's name (``runs/x/last.pt`` -> ``x``)."""
    if args.model_name is not None:
        return args.model_name
    return Path(args.checkpoint).resolve().parent.name or "model"


def _check_serve_args(args) -> None:
    if args.replicas < 1:
        raise ValueError(f"replicas: expected a positive int, got {args.replicas}")
    if args.replicas > 1 and args.backend != "ray":
        raise ValueError(f"replicas: {args.replicas} replicas need --backend ray (the local backend is one process)")
    if not 0 <= args.drain_timeout_s < float("inf"):
        raise ValueError(f"drain-timeout-s: expected finite seconds >= 0, got {args.drain_timeout_s}")


def _serve_info(args, spec) -> tuple[str, dict]:
    mode = f"budget {args.budget}" if args.budget is not None else "full depth (no budget)"
    return mode, {"checkpoint": str(args.checkpoint), "model": spec["model"], "dataset": spec["dataset"], "mode": mode}


def build_replica_server(args):
    """The :class:`EarlyExitServer` of one Ray Serve replica (not started): :func:`build_server`."""
    return build_server(args)[0]


def cmd_serve(args) -> int:
    _check_serve_args(args)
    from ann_kernels.serve.lm_command import is_lm_checkpoint, serve_lm, serve_lm_on_ray

    if is_lm_checkpoint(args.checkpoint):  # an LM: OpenAI /v1/completions (docs/serving_lm.md)
        if args.backend == "ray":
            return serve_lm_on_ray(args, model_name_of(args))
        return serve_lm(args, model_name_of(args))
    if args.backend == "ray":
        return _serve_on_ray(args)
    from ann_kernels.serve import create_app, require_serve_extra

    require_serve_extra()
    from ann_kernels.serve.runner import serve_until_drained

    server, spec = build_server(args)
    mode, info = _serve_info(args, spec)
    name = model_name_of(args)
    server.start()
    try:
        app = create_app(server, model_name=name, sample_shape=tuple(spec["input_shape"]),
                         max_body_bytes=args.max_body_bytes, info=info)
    except BaseException:
        server.close(timeout=args.drain_timeout_s)
        raise
    print(f"serving {args.checkpoint} as model {name!r} ({spec['model']} on {spec['dataset']}, {mode}) on "
          f"http://{args.host}:{args.port}  (POST /predict, /v2/models/{name}/infer; GET /metrics, /stats, "
          f"/healthz, /v2/health/ready)", flush=True)
    return serve_until_drained(app, server, args, finished=lambda stats: (
        f"{stats.requests_completed} requests completed, {stats.requests_failed} failed"))


def _serve_on_ray(args) -> int:
    import functools

    from ann_kernels.serve.ray_app import replica_cpus, run_until_signal, server_deployment
    from ann_kernels.train.runs import load_trained

    _, spec, _ = load_trained(args.checkpoint)  # fail here, not in every replica
    mode, info = _serve_info(args, spec)
    name = model_name_of(args)
    cpus = replica_cpus(args.replicas)
    application = server_deployment(
        functools.partial(build_replica_server, args), replicas=args.replicas, num_cpus=cpus,
        drain_timeout_s=args.drain_timeout_s,
        app_options={"model_name": name, "sample_shape": tuple(spec["input_shape"]),
                     "max_body_bytes": args.max_body_bytes, "info": info})
    return run_until_signal(application, name=name, host=args.host, port=args.port, banner=(
        f"serving {args.checkpoint} as model {name!r} on Ray Serve: {args.replicas} replica(s), {cpus:g} CPU "
        f"each, http://{args.host}:{args.port} (the single-process routes)"))


def add_parser(subparsers) -> None:
    """Register ``calibrate``, ``infer`` and ``serve`` on ``subparsers``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="a last.pt written by ann-kernels train")
        p.add_argument(
            "--criterion",
            choices=("max_prob", "entropy", "margin"),
            default="max_prob",
            help="exit confidence measure",
        )
        p.add_argument(
            "--data-dir", default=None, help="override the data directory stored in the checkpoint"
        )
        p.add_argument(
            "--limit", type=int, default=None, help="use only the first N validation and test images"
        )
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")

    p = subparsers.add_parser(
        "calibrate",
        help="MSDNet thresholds per budget: validation -> test table + plot",
        description="Calibrate exit thresholds for mean-FLOP budgets on the validation "
        "split; print the accuracy-budget table on the test split and write "
        "budgeted.png and calibration.json. " + _BUDGET_HELP,
    )
    common(p)
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="budgets (default: 8 from the cheapest exit to the full network)",
    )
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint's directory)")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser(
        "infer",
        help="real early exit on the test split: accuracy, FLOPs, throughput",
        description="Calibrate thresholds for --budget on the validation split, then run "
        "EarlyExitEngine on the test split and compare its throughput with the "
        "full network. " + _BUDGET_HELP,
    )
    common(p)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument(
        "--stream", action="store_true", help="use stream() rebatching instead of predict per batch"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches")
    p.set_defaults(func=cmd_infer)

    p = subparsers.add_parser(
        "serve",
        help="HTTP endpoint (POST /predict, Open Inference Protocol /v2, /metrics) over EarlyExitServer",
        description="Serve a checkpoint over HTTP with stage-level continuous batching "
        "(needs the [serve] extra: FastAPI + uvicorn). With --budget, thresholds are calibrated "
        "on the validation split first. " + _BUDGET_HELP,
    )
    common(p)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="most rows per stage run (default 256); an LM: rows decoded at once (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="longest wait for a fuller batch per stage")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.add_argument("--model-name", default=None,
                   help="the Open Inference Protocol model name (/v2/models/NAME; default: the run directory's name)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM: readiness 503, new requests 503, wait this long for the accepted ones, exit")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="do not gc.freeze() the objects alive after loading (default: freeze them, so the "
                        "cyclic collector's full passes stop rescanning the model and libraries; docs/serving.md)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: one process (uvicorn); ray: replicas on a local Ray Serve instance (extra [ray])")
    p.add_argument("--replicas", type=int, default=1, help="server replicas (--backend ray)")
    lm = p.add_argument_group("LM checkpoints (OpenAI /v1/completions; per-request 'early_exit' overrides these)")
    lm.add_argument("--mode", choices=("full", "static", "confidence", "self_speculative"), default="full",
                    help="the default generation mode")
    lm.add_argument("--exit-index", type=int, default=None, help="static / self_speculative: the (draft) exit")
    lm.add_argument("--threshold", type=float, default=None, help="confidence: the exit threshold")
    lm.add_argument("--draft-len", type=int, default=None, help="self_speculative: drafted tokens per step")
    lm.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond which requests get 429")
    lm.add_argument("--prefill-chunk-tokens", type=int, default=None,
                    help="prefill a prompt that joins running rows in chunks of at most this many positions, "
                         "with decode steps between them (default: whole; docs/serving_lm.md)")
    p.set_defaults(func=cmd_serve)


_BUDGET_HELP = "A budget <= 1 is a fraction of the full network's FLOPs per image; > 1 is FLOPs per image."
