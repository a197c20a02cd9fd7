"""Multi-process data-parallel training on CPU (``torch.distributed``, gloo backend).

:class:`~ann_kernels.train.trainer.Trainer` notices an initialised process group by
itself: it wraps the model in ``DistributedDataParallel``, shards the training set with a
``DistributedSampler`` and, after every optimiser step, calls
``loss_fn.weighting.synchronize_()`` (AdaLoss: all-reduce-average the running loss
averages ``ema`` [K]) so every rank computes the same exit weights. Rank 0 alone
evaluates, logs, checkpoints and plots.

This module starts the processes: :func:`launch` spawns ``world_size`` local workers,
each running ``fn(rank, world_size, *args)`` inside an initialised gloo group;
:func:`init_from_env` joins the group an external launcher describes (``torchrun``:
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so ``torchrun --nproc-per-node N
-m ann_kernels train ...`` trains like ``--nproc N``. The early-exit LM
(:func:`ann_kernels.train.lm.train_lm`) notices the group the same way.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused local TCP port for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, *, threads: int | None = 1) -> None:
    """Join a gloo group on localhost:``port`` as ``rank`` of ``world_size``.
    ``threads``: intra-op threads per process (1 keeps 2 processes on 2 cores from
    oversubscribing; None leaves torch's default)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> tuple[int, int] | None:
    """Join the process group of an external launcher (torchrun's environment variables):
    gloo, or NCCL when CUDA is available. Returns ``(rank, world_size)``, or None (and does
    nothing) when the environment names no group of more than one rank."""
    if not launched_by_torchrun():
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def leave_process_group() -> None:
    """Leave the default group cleanly: a barrier first (no rank tears its connections
    down while a peer still waits on a collective), then ``destroy_process_group``."""
    dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End a rank's process now, skipping interpreter finalisation (stdio and logging are
    flushed first).

    Why: a gloo worker thread (``ProcessGroupGloo::runLoop``) destroys a finished
    collective's work object, and with it the Python objects of its tensors (which needs
    the GIL), a moment *after* the collective reports completion. If the interpreter is
    finalising by then, CPython ends that thread inside C++ frames and libstdc++ aborts the
    process ("terminate called without an active exception", SIGABRT), although every
    byte of work was done: 4-6 of 30 two-process runs of ``tests/test_lm_distributed.py``
    on torch 2.13 CPU, core dump read with gdb. ``destroy_process_group`` does not join
    those threads; not finalising closes the window."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced stream
            pass
    logging.shutdown()
    os._exit(code)


def _worker(rank: int, world_size: int, port: int, threads, fn: Callable, args: tuple) -> None:
    init_process_group(rank, world_size, port, threads=threads)
    try:
        fn(rank, world_size, *args)
    except BaseException:  # spawn writes the traceback for the parent; tear down best-effort
        dist.destroy_process_group()
        raise
    leave_process_group()
    exit_process(0)


def launch(fn: Callable, world_size: int, *args, threads: int | None = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned local processes, each
    in an initialised gloo process group; wait for all of them. ``fn`` must be picklable
    (a module-level function). A failing rank raises here (``ProcessRaisedException``)."""
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1 processes, got {world_size}")
    mp.spawn(_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)


def all_equal(tensor: torch.Tensor) -> bool:
    """True iff ``tensor`` is bit-identical on every rank (compares against rank 0's copy)."""
    ref = tensor.detach().clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([int(torch.equal(ref, tensor.detach()))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
