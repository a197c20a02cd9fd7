"""Training and evaluating early-exit language models (``ann-kernels train --dataset text``,
``ann-kernels eval`` of such a checkpoint, ``ann-kernels demo --lm``).

The model is :func:`ann_kernels.nn.causal_lm.causal_exit_lm`; the loss is
:class:`ann_kernels.AnytimeLinearLoss` (the fused linear + multi-exit cross-entropy, never
materialising the K x tokens x V logits) with any weighting scheme, including
``layerskip``. Every epoch: per-exit validation and test perplexity and next-token accuracy,
``metrics.jsonl``, ``last.pt`` (resumable: model, optimiser, schedule, loss state, RNGs) and
``anytime.png`` (perplexity and accuracy against per-token FLOPs).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ann_kernels.losses.linear_loss import AnytimeLinearLoss
from ann_kernels.losses.lm_objective import EarlyExitLMObjective
from ann_kernels.nn.causal_lm import causal_exit_lm
from ann_kernels.ops.multi_exit_linear_ce import multi_exit_linear_cross_entropy
from ann_kernels.train.metrics import append_jsonl, format_flops, read_jsonl, truncate_jsonl
from ann_kernels.train.text import add_text_args, load_text_data  # noqa: F401  (re-exported)
from ann_kernels.train.trainer import cosine_lambda, seed_everything

__all__ = ["LM_FORMAT", "add_text_args", "train_lm", "train_lm_worker", "evaluate_lm", "cmd_train_lm", "cmd_eval_lm", "demo_lm",
           "is_lm_checkpoint", "plot_lm"]

LM_FORMAT = "ann_kernels-lm-1"
DEFAULT_MODEL = {"dim": 128, "layers": 4, "heads": 4}
# Measured on this shared 2-core CPU: 0.3 s per step at load ~3 (2.7 s at load ~9, vocabulary 4096);
# vocabulary 2048 and 4000 sequences (250 steps): ~1.5 min at load ~3, longer under heavy load.
DEMO = {"vocab_size": 2048, "seq_len": 64, "batch_size": 16, "limit_train": 4000, "limit_eval": 100, "epochs": 1,
        "lr": 5e-3, "model": {"dim": 96, "layers": 4, "heads": 4}}


def is_lm_checkpoint(path) -> bool:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - not ours; the image path reports the error
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == LM_FORMAT


@torch.inference_mode()
def evaluate_lm(model, dataset, *, batch_size: int = 32) -> dict[str, list[float]]:
    """Per-exit mean next-token NLL, perplexity and accuracy over every token of ``dataset``."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    nll, correct, count = None, None, 0
    heads = model.lm_heads
    weight = heads[0].weight if model.shared_head else torch.stack([h.weight for h in heads])
    for x, y in loader:
        hidden = [h.reshape(-1, h.shape[-1]) for h in model.forward_hidden(x)]
        target = y.reshape(-1)
        out = multi_exit_linear_cross_entropy(hidden, weight, target)
        s = out.per_sample.double().sum(1)
        c = (out.prediction == target).double().sum(1)
        nll, correct = (s, c) if nll is None else (nll + s, correct + c)
        count += target.numel()
    model.train(was_training)
    loss = (nll / count).tolist()
    return {"loss": loss, "ppl": [math.exp(v) for v in loss], "acc": (correct / count).tolist()}


def plot_lm(flops, results: dict[str, dict], path) -> Path:
    """Two panels: perplexity and next-token accuracy per exit against per-token FLOPs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    ax1, ax2 = fig.subplots(1, 2)
    x = [f / 1e6 for f in flops]
    for label, r in results.items():
        ax1.plot(x, r["ppl"], marker="o", label=label)
        ax2.plot(x, [100 * a for a in r["acc"]], marker="o", label=label)
    ax1.set_ylabel("perplexity")
    ax1.set_yscale("log")
    ax2.set_ylabel("next-token accuracy (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("cumulative cost per token (MFLOPs)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Early-exit language model: every exit")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _build(spec: dict, world_size: int = 1):
    seed_everything(spec["seed"])
    data = load_text_data(spec["out"], text_glob=spec["text_glob"], vocab_size=spec["vocab_size"],
                          seq_len=spec["seq_len"], limit_train=spec["limit_train"], limit_eval=spec["limit_eval"],
                          progress=spec["progress"])
    model = causal_exit_lm(data.vocab_size, max_len=spec["seq_len"], **spec["model_kwargs"])
    weighting_kwargs = dict(spec["weighting_kwargs"])
    if spec["weighting"] == "layerskip":
        weighting_kwargs.setdefault("exit_layers", model.exit_layers)
        weighting_kwargs.setdefault("num_layers", model.num_layers)
        if weighting_kwargs.get("curriculum") == "gradual":  # the whole run's optimiser steps
            per_rank = len(data.train) // world_size
            weighting_kwargs.setdefault("max_steps", spec["epochs"] * math.ceil(per_rank / spec["batch_size"]))
    heads = model.lm_heads[0] if model.shared_head else model.lm_heads
    loss_fn = AnytimeLinearLoss(heads, model.num_exits, spec["weighting"], z_loss=spec["z_loss"],
                                label_smoothing=spec["label_smoothing"], **weighting_kwargs)
    return data, model, loss_fn


def _load_data_ranked(spec: dict, rank: int, distributed: bool):
    """Rank 0 builds (or reads) the tokenizer and token cache first; the others then read it."""
    if distributed and rank != 0:
        dist.barrier()
    built = _build(dict(spec, progress=spec["progress"] and rank == 0), dist.get_world_size() if distributed else 1)
    if distributed and rank == 0:
        dist.barrier()
    return built


def train_lm(spec: dict, *, resume: bool = False, until_epoch: int | None = None) -> list[dict]:
    """Train per ``spec`` (see :func:`cmd_train_lm`); writes into ``spec["out"]``.
    ``until_epoch`` stops after that epoch (as an interrupted run would; resume continues).

    Under an initialised ``torch.distributed`` process group (``--nproc N`` or torchrun)
    it trains data-parallel: the model and loss run as one
    :class:`~ann_kernels.losses.lm_objective.EarlyExitLMObjective` wrapped in DDP
    (gradients averaged over ranks), each rank reads its own shard of the training blocks
    (``DistributedSampler``: rank r takes positions r, r + N, ... of the epoch's seeded
    permutation, so the N per-rank batches of ``batch_size`` together are exactly the
    one-process batch of N x ``batch_size``), and after every step
    ``loss_fn.weighting.synchronize_()`` averages AdaLoss's running losses over ranks (the
    one-process update on the global batch). Rank 0 alone evaluates, logs and checkpoints.
    Layer dropout draws from each rank's torch RNG (seeded alike), so with it a rank-split
    step is not the one-process step on the same batch (it is without layer dropout).
    """
    if until_epoch is not None and not 0 <= until_epoch <= spec["epochs"]:
        raise ValueError(f"until_epoch (--stop-after-epoch): expected 0..{spec['epochs']} (--epochs), got {until_epoch}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    spec = dict(spec, world_size=world)
    progress = spec["progress"] and rank == 0
    out = Path(spec["out"])
    data, model, loss_fn = _load_data_ranked(spec, rank, distributed)
    if len(data.train) < spec["batch_size"] * world:
        raise ValueError(f"batch_size: {spec['batch_size']} (x {world} processes) is larger than the training set "
                         f"({len(data.train)} sequences); lower --batch-size or raise --limit-train")
    lr = spec["lr"] or (2e-3 if spec["optimizer"] == "adamw" else 0.05)
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec["weight_decay"] or 0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                              weight_decay=spec["weight_decay"] or 5e-4)
    # 1. each rank's shard of the blocks (world 1: the whole epoch's permutation)
    sampler = torch.utils.data.DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=spec["seed"], drop_last=True)
    loader = torch.utils.data.DataLoader(data.train, batch_size=spec["batch_size"], sampler=sampler,
                                         drop_last=False)
    steps_per_epoch = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(spec["epochs"] * steps_per_epoch,
                                                                 spec["warmup_steps"]))
    epoch, step, history = 0, 0, []
    ckpt_path, metrics_path = out / "last.pt", out / "metrics.jsonl"
    if resume and ckpt_path.is_file():  # 2. every rank restores the same state
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in ("epochs", "batch_size", "seed", "optimizer", "seq_len", "vocab_size", "world_size"):
            if ckpt["spec"].get(key, 1 if key == "world_size" else None) != spec.get(key, 1 if key == "world_size"
                                                                                     else None):
                raise ValueError(f"{ckpt_path}: trained with {key}={ckpt['spec'].get(key)!r} but this run has "
                                 f"{key}={spec.get(key)!r}; resuming needs the same settings")
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt["loss"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        epoch, step = ckpt["epoch"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if rank == 0 and metrics_path.is_file():
            truncate_jsonl(metrics_path, epoch)
            history = read_jsonl(metrics_path)
        if progress:
            tqdm.write(f"resumed from {ckpt_path} at epoch {epoch}, step {step}")
    flops = model.per_token_exit_flops(spec["seq_len"]).tolist()
    objective = EarlyExitLMObjective(model, loss_fn, autocast_dtype=torch.bfloat16 if spec["bf16"] else None)
    # 3. DDP over the whole step (forward_hidden + loss); the loss state stays per rank
    step_module = torch.nn.parallel.DistributedDataParallel(objective, broadcast_buffers=False) \
        if distributed else objective
    sync = loss_fn.weighting.synchronize_ if distributed else None
    stop = spec["epochs"] if until_epoch is None else until_epoch
    while epoch < stop:
        t0 = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"[lm {spec['weighting']}] epoch {epoch + 1}/{spec['epochs']}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for x, y in bar:
            loss = step_module(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower --lr (now "
                                         f"{sched.get_last_lr()[0]:.3g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if sync is not None:  # 4. AdaLoss: average the running losses over ranks
                sync()
            total += loss.item()
            n += 1
            step += 1
            bar.set_postfix_str(f"loss {loss.item():.3f}  exit losses "
                                + " ".join(f"{v:.2f}" for v in loss_fn.last_per_exit.tolist()), refresh=False)
        bar.close()
        epoch += 1
        if rank == 0:  # 5. rank 0: evaluate, log, checkpoint
            history.append(_finish_epoch(spec, model, loss_fn, opt, sched, data, epoch, step, flops,
                                         total / max(n, 1), time.perf_counter() - t0, world))
        if distributed:
            dist.barrier()
    if history and rank == 0:
        last = history[-1]
        plot_lm(flops, {f"test ({spec['weighting']})": {"ppl": last["test_ppl"], "acc": last["test_acc"]}},
                out / "anytime.png")
    return history


def _finish_epoch(spec, model, loss_fn, opt, sched, data, epoch, step, flops, train_loss, train_s, world) -> dict:
    out = Path(spec["out"])
    record = {"epoch": epoch, "step": step, "train_loss": train_loss, "lr": sched.get_last_lr()[0],
              "weights_last": loss_fn.weights.tolist(), "train_time_s": train_s, "world_size": world,
              "exit_flops_per_token": flops, "exit_layers": model.exit_layers}
    for name, ds in (("val", data.val), ("test", data.test)):
        r = evaluate_lm(model, ds)
        record.update({f"{name}_ppl": r["ppl"], f"{name}_acc": r["acc"], f"{name}_loss": r["loss"]})
    if spec["progress"]:
        tqdm.write(f"[lm] epoch {epoch}/{spec['epochs']}  loss {record['train_loss']:.3f}  test ppl/exit "
                   + " ".join(f"{v:.1f}" for v in record["test_ppl"]) + "  acc/exit "
                   + " ".join(f"{100 * v:.1f}" for v in record["test_acc"]) + f"  {train_s:.0f}s")
    append_jsonl(out / "metrics.jsonl", record)
    state = {"format": LM_FORMAT, "spec": spec, "epoch": epoch, "step": step, "model": model.state_dict(),
             "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "exit_flops_per_token": flops, "vocab_size": data.vocab_size,
             "rng": {"torch": torch.get_rng_state()}}
    tmp = out / "last.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "last.pt")
    return record


def train_lm_worker(rank: int, world_size: int, spec: dict, resume: bool = False,
                    until_epoch: int | None = None) -> None:
    """:func:`train_lm` in one process of a group (``distributed.launch`` calls it)."""
    train_lm(spec, resume=resume, until_epoch=until_epoch)


def _spec_from_args(args) -> dict:
    model_kwargs = dict(DEFAULT_MODEL)
    model_kwargs.update(dict(args.model_arg))
    if args.num_exits is not None:
        model_kwargs["num_exits"] = args.num_exits
    return {"out": str(args.out), "text_glob": args.text_glob, "vocab_size": args.vocab_size,
            "seq_len": args.seq_len, "limit_train": args.limit_train, "limit_eval": args.limit_eval,
            "model_kwargs": model_kwargs, "weighting": args.weighting, "weighting_kwargs": dict(args.weighting_arg),
            "z_loss": args.z_loss, "label_smoothing": args.label_smoothing, "epochs": args.epochs,
            "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps, "bf16": args.bf16,
            "seed": args.seed, "progress": args.progress}


def _table(flops, r: dict) -> str:
    lines = [f"{'exit':>4}  {'FLOPs/token':>11}  {'ppl':>8}  {'acc %':>6}", "-" * 36]
    for k, f in enumerate(flops):
        lines.append(f"{k + 1:>4}  {format_flops(f):>11}  {r['ppl'][k]:>8.2f}  {100 * r['acc'][k]:>6.2f}")
    return "\n".join(lines)


def cmd_train_lm(args) -> int:
    """``ann-kernels train --dataset text``: --model-arg dim/layers/heads/exit_layers/shared_head/
    tie_embeddings, --num-exits, --weighting (any, incl. layerskip), --weighting-arg."""
    t0 = time.perf_counter()
    spec = _spec_from_args(args)
    until = getattr(args, "stop_after_epoch", None)
    if getattr(args, "nproc", 1) > 1:  # N local processes (gloo)
        from ann_kernels.train.distributed import launch

        launch(train_lm_worker, args.nproc, spec, args.resume, until)
    else:  # one process, or one rank of a torchrun group (initialised by the caller)
        train_lm(spec, resume=args.resume, until_epoch=until)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return 0
    last = read_jsonl(Path(args.out) / "metrics.jsonl")[-1]
    print(_table(last["exit_flops_per_token"], {"ppl": last["test_ppl"], "acc": last["test_acc"]}))
    print(f"wrote {args.out}/last.pt, metrics.jsonl, anytime.png in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_eval_lm(args) -> int:
    """``ann-kernels eval --checkpoint`` of a text model: per-exit perplexity and accuracy."""
    import json

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec = dict(ckpt["spec"])
    spec["progress"] = False
    if args.limit is not None:
        spec["limit_eval"] = args.limit
    data, model, _ = _build(spec)
    model.load_state_dict(ckpt["model"])
    dataset = {"test": data.test, "val": data.val, "train": data.train}[args.split]
    r = evaluate_lm(model, dataset, batch_size=min(args.batch_size, 64))
    flops = ckpt["exit_flops_per_token"]
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split,
                          "tokens": len(dataset) * spec["seq_len"], "exit_flops_per_token": flops, **r}))
        return 0
    print(f"{args.checkpoint}: causal LM (exits after layers {model.exit_layers}) trained {ckpt['epoch']} epochs "
          f"with {spec['weighting']}; {args.split} split, {len(dataset) * spec['seq_len']} tokens")
    print(_table(flops, r))
    return 0


def demo_lm(args) -> int:
    """``ann-kernels demo --lm``: a short early-exit LM run on the stdlib (a few minutes)."""
    import argparse

    t0 = time.perf_counter()
    ns = argparse.Namespace(
        out=str(Path(args.out).with_name(Path(args.out).name + "-lm")) if not getattr(args, "lm_out", None)
        else args.lm_out, text_glob=None, vocab_size=DEMO["vocab_size"], seq_len=DEMO["seq_len"],
        limit_train=DEMO["limit_train"], limit_eval=DEMO["limit_eval"], model_arg=list(DEMO["model"].items()),
        num_exits=None, weighting="layerskip", weighting_arg=[("scale", "sum")], z_loss=1e-4,
        label_smoothing=0.0, epochs=DEMO["epochs"], batch_size=DEMO["batch_size"], optimizer="adamw",
        lr=DEMO["lr"], weight_decay=None, warmup_steps=20, bf16=False, seed=args.seed, progress=args.progress,
        resume=args.resume)
    print(f"demo --lm: causal LM {DEMO['model']} with an exit after every layer, trained on "
          f"{DEMO['limit_train']} sequences of {DEMO['seq_len']} tokens of the CPython stdlib with the fused "
          f"linear + multi-exit loss (LayerSkip 'sum' scales); output in {ns.out}/", flush=True)
    cmd_train_lm(ns)
    print(f"plot: {ns.out}/anytime.png   demo wall time: {time.perf_counter() - t0:.0f} s")
    return 0
