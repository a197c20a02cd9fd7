"""``ann-kernels serve --checkpoint runs/lm/last.pt`` on an LM checkpoint (format
``ann_kernels-lm-1``, ``ann-kernels train --dataset text``): a
:class:`~ann_kernels.generation.GenerationServer` with the run directory's tokenizer, served
with the OpenAI protocol (:mod:`.openai_api`) and ``/metrics`` by uvicorn, drained on SIGTERM
like the classifier server (:mod:`.runner`); with ``--backend ray --replicas N``, N replicas on a
local Ray Serve instance (:func:`serve_lm_on_ray`, :mod:`.ray_app`). ``ann_kernels.inference.commands.cmd_serve``
dispatches here when the checkpoint is an LM one (:func:`is_lm_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["LM_DEFAULT_MAX_BATCH_SIZE", "build_lm_replica_server", "build_lm_server", "is_lm_checkpoint",
           "lm_mode_settings", "lm_ray_application", "load_servable_lm", "serve_lm", "serve_lm_on_ray"]

LM_DEFAULT_MAX_BATCH_SIZE = 32


def is_lm_checkpoint(path) -> bool:
    """True if ``path`` is an LM checkpoint (read memory-mapped: the weights are not loaded)."""
    from ann_kernels.train.lm import LM_FORMAT

    path = Path(path)
    if not path.is_file():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001  not a zip checkpoint: the classifier loader says why
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == LM_FORMAT


def lm_mode_settings(args) -> dict:
    """The server's default mode settings from ``--mode``, ``--criterion``, ``--exit-index``,
    ``--threshold``, ``--draft-len``, after checking the arguments that do not apply to an LM."""
    if args.budget is not None:
        raise ValueError("budget: --budget is for classifier checkpoints; an LM takes --mode confidence "
                         "--threshold T (or --mode self_speculative --exit-index K)")
    if args.max_wait_ms < 0:
        raise ValueError(f"max-wait-ms: expected milliseconds >= 0, got {args.max_wait_ms}")
    mode = {"mode": args.mode, "criterion": args.criterion}
    if args.exit_index is not None:
        mode["exit_index"] = args.exit_index
    if args.threshold is not None:
        mode["threshold"] = args.threshold
    if args.draft_len is not None:
        mode["draft_len"] = args.draft_len
    return mode


def load_servable_lm(args):
    """The checkpoint's :class:`~ann_kernels.generation.checkpoint.LMCheckpoint`; FileNotFoundError
    without its tokenizer (an LM is served with text prompts)."""
    from ann_kernels.generation.checkpoint import load_lm_checkpoint

    lm = load_lm_checkpoint(args.checkpoint)
    if lm.tokenizer is None:
        raise FileNotFoundError(f"{lm.run_dir}/tokenizer.json: an LM is served with its tokenizer (text prompts)")
    return lm


def build_lm_server(args):
    """(GenerationServer, its info dict) from the ``serve`` command's arguments."""
    from ann_kernels.generation.server import GenerationServer

    mode = lm_mode_settings(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = load_servable_lm(args)
    server = GenerationServer(lm.model, lm.tokenizer, max_batch_size=args.max_batch_size or LM_DEFAULT_MAX_BATCH_SIZE,
                              max_wait_s=args.max_wait_ms / 1e3, max_queue=args.max_queue,
                              eos_token_id=lm.eos_token_id, max_new_tokens=16,
                              prefill_chunk_tokens=args.prefill_chunk_tokens, **mode)
    described = ", ".join(f"{k}={v}" for k, v in mode.items())
    return server, {"checkpoint": str(args.checkpoint), "mode": described}


def build_lm_replica_server(args):
    """The ``GenerationServer`` of one Ray Serve replica (:func:`build_lm_server`)."""
    return build_lm_server(args)[0]


def lm_ray_application(args, model_name: str, *, num_cpus: float | None = None):
    """(the bound Ray Serve application of ``args.replicas`` LM replicas, CPUs per replica):
    :func:`~ann_kernels.serve.ray_app.server_deployment` over :func:`build_lm_replica_server`,
    each replica serving the same OpenAI routes as one process. The checkpoint and the
    arguments are checked here first (not in every replica)."""
    import functools

    from ann_kernels.serve.ray_app import replica_cpus, server_deployment

    mode = lm_mode_settings(args)
    load_servable_lm(args)
    cpus = replica_cpus(args.replicas) if num_cpus is None else num_cpus
    info = {"checkpoint": str(args.checkpoint), "mode": ", ".join(f"{k}={v}" for k, v in mode.items())}
    application = server_deployment(
        functools.partial(build_lm_replica_server, args), replicas=args.replicas, num_cpus=cpus,
        drain_timeout_s=args.drain_timeout_s, name=model_name,
        app_options={"model_name": model_name, "max_body_bytes": args.max_body_bytes, "info": info})
    return application, cpus


def serve_lm_on_ray(args, model_name: str) -> int:
    """``serve --backend ray --replicas N`` on an LM checkpoint: N replicas on a local Ray
    Serve instance until SIGTERM (then Ray Serve drains them); the exit status."""
    from ann_kernels.serve import require_serve_extra
    from ann_kernels.serve.ray_app import run_until_signal

    require_serve_extra()
    application, cpus = lm_ray_application(args, model_name)
    return run_until_signal(application, name=model_name, host=args.host, port=args.port, banner=(
        f"serving LM {args.checkpoint} as model {model_name!r} on Ray Serve: {args.replicas} replica(s), "
        f"{cpus:g} CPU each, http://{args.host}:{args.port}  (POST /v1/completions; GET /v1/models, /metrics, "
        f"/stats, /healthz of the replica that answers)"))


def serve_lm(args, model_name: str) -> int:
    """Run the LM server until SIGTERM (then drain); the exit status."""
    from ann_kernels.serve import create_app, require_serve_extra

    require_serve_extra()
    from ann_kernels.serve.runner import serve_until_drained

    server, info = build_lm_server(args)
    try:
        app = create_app(server, model_name=model_name, max_body_bytes=args.max_body_bytes, info=info)
    except BaseException:
        server.close(timeout=args.drain_timeout_s)
        raise
    print(f"serving LM {args.checkpoint} as model {model_name!r} ({info['mode']}, {server.num_exits} exits) on "
          f"http://{args.host}:{args.port}  (POST /v1/completions; GET /v1/models, /metrics, /stats, /healthz)",
          flush=True)
    return serve_until_drained(app, server, args, finished=lambda stats: (
        f"{sum(stats.requests_finished.values())} requests finished, {stats.requests_failed} failed"))
