"""Ops: one file per op, each holding its pure-torch reference, its dispatch and its
torch.library registrations (fake kernels, and the CUDA kernel when Triton is present)."""

from ann_kernels.ops.early_exit import (
    ExitStep,
    early_exit_step,
    early_exit_step_reference,
    exit_confidence,
    exit_confidence_reference,
)
from ann_kernels.ops.multi_exit_ce import (
    ExitLoss,
    multi_exit_cross_entropy,
    multi_exit_cross_entropy_reference,
)
from ann_kernels.ops.multi_exit_linear_ce import (
    multi_exit_linear_cross_entropy,
    multi_exit_linear_cross_entropy_reference,
)

__all__ = [
    "multi_exit_linear_cross_entropy",
    "multi_exit_linear_cross_entropy_reference",
    "ExitLoss",
    "ExitStep",
    "early_exit_step",
    "early_exit_step_reference",
    "exit_confidence",
    "exit_confidence_reference",
    "multi_exit_cross_entropy",
    "multi_exit_cross_entropy_reference",
]
