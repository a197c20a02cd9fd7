"""Shared test helpers (import from here; do not copy per file)."""

from __future__ import annotations

import os

import pytest
import torch

import ann_kernels

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

# Device parametrisation for every test that can run on CUDA: ``@pytest.mark.parametrize(
# "device", DEVICES)`` or the ``device`` fixture (tests/conftest.py). The CUDA case carries
# the ``cuda`` marker, so ``pytest -m cuda`` is the GPU subset (scripts/gpu_check.sh), and
# skips with the reason "no CUDA device" where there is none (visible with ``-ra``).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda], id="cuda")]

requires_ext = pytest.mark.skipif(
    not ann_kernels.HAS_CPP_EXT,
    reason="the C++ extension ann_kernels._C is not built (pip install --no-build-isolation -e .)",
)


def require_ext_or_skip() -> None:
    """In CI (ANN_KERNELS_REQUIRE_EXT=1) the import itself fails; elsewhere skip with a reason."""
    if not ann_kernels.HAS_CPP_EXT:
        pytest.skip("the C++ extension ann_kernels._C is not built")


def make_logits(num_exits: int, n: int, c: int, dtype=torch.float32, *, scale: float = 3.0, seed: int = 0,
                requires_grad: bool = True) -> list[torch.Tensor]:
    """K leaf logits tensors [N, C] with entries ~ scale * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(n, c, generator=gen)).to(dtype).requires_grad_(requires_grad)
        for _ in range(num_exits)
    ]


def make_target(n: int, c: int, *, seed: int = 1, ignore_frac: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=gen)
    if ignore_frac > 0:
        target[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    return target


def grads_of(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def low_precision_bound(kernel_out: torch.Tensor, torch_out: torch.Tensor, truth: torch.Tensor,
                        *, floor: float = 1e-6) -> tuple[float, float]:
    """flash-attention's rule: the kernel's error against an fp32 truth must be at most twice
    torch's own error at the same dtype (plus a tiny absolute floor for exact cases)."""
    kernel_err = max_abs_err(kernel_out, truth)
    torch_err = max_abs_err(torch_out, truth)
    return kernel_err, 2 * torch_err + floor


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def tiny_mlp_exit_net(*, in_features: int, hidden: int, num_exits: int, num_classes: int,
                      batch_norm: bool = False, flatten: bool = False):
    """A tiny ``MultiExitNetwork`` of Linear (+ BatchNorm1d) + Tanh stages with Linear heads
    (smooth, so finite differences and second-order gradients behave)."""
    from torch import nn

    from ann_kernels.nn import MultiExitNetwork

    def stage(n_in):
        layers = [nn.Flatten()] if flatten and n_in == in_features else []
        layers.append(nn.Linear(n_in, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    stages = [stage(in_features)] + [stage(hidden) for _ in range(num_exits - 1)]
    heads = [nn.Linear(hidden, num_classes) for _ in range(num_exits)]
    return MultiExitNetwork(stages, heads, num_classes=num_classes)


def profiled_ops(fn, *, profile_memory: bool = False):
    """Run ``fn()`` under torch.profiler (CPU activity, shapes recorded) and return its
    kineto events (``.name()``, ``.dtypes()``, ``.shapes()``, ``.nbytes()``, ``.start_ns()``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=profile_memory) as prof:
        fn()
    return list(prof.profiler.kineto_results.events())


def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes allocated (and not yet freed) while ``fn()`` runs, from the
    allocator's own records (torch.profiler memory events: every allocation and free of
    torch's CPU/CUDA allocators, in time order), not from wall-clock or RSS."""
    events = [e for e in profiled_ops(fn, profile_memory=True) if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
