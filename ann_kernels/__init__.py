"""ann_kernels: fused kernels, training and budgeted early-exit inference for anytime
neural networks (networks with several exit heads).

``HAS_CPP_EXT`` tells whether the C++ extension loaded; without it every op runs through
its pure-torch reference (with a one-time warning).
"""

from ann_kernels._ext import HAS_CPP_EXT, HAS_TRITON
from ann_kernels.losses import AdaLoss, AnytimeLoss
from ann_kernels.inference import EarlyExitEngine, calibrate_for_budget, calibrate_thresholds
from ann_kernels.inference.server import EarlyExitServer
from ann_kernels.nn import MultiExitNetwork
from ann_kernels.sequence import EANN, EANNEngine, eann
from ann_kernels.ops.multi_exit_ce import (
    ExitLoss,
    multi_exit_cross_entropy,
    multi_exit_cross_entropy_reference,
)
from ann_kernels.ops.multi_exit_linear_ce import (
    multi_exit_linear_cross_entropy,
    multi_exit_linear_cross_entropy_reference,
)
from ann_kernels.losses.linear_loss import AnytimeLinearLoss
from ann_kernels.generation import DecodeState, GenerationOutput, GenerationServer, generate

__version__ = "0.1.0"

__all__ = [
    "DecodeState",
    "GenerationOutput",
    "GenerationServer",
    "generate",
    "AnytimeLinearLoss",
    "multi_exit_linear_cross_entropy",
    "multi_exit_linear_cross_entropy_reference",
    "AdaLoss",
    "AnytimeLoss",
    "EarlyExitEngine",
    "EarlyExitServer",
    "calibrate_for_budget",
    "calibrate_thresholds",
    "HAS_CPP_EXT",
    "HAS_TRITON",
    "ExitLoss",
    "multi_exit_cross_entropy",
    "multi_exit_cross_entropy_reference",
    "MultiExitNetwork",
    "EANN",
    "EANNEngine",
    "eann",
]
