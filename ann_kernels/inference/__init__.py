"""Budgeted early-exit inference: the engine (stage-by-stage execution on the still-active
samples with the fused exit op), MSDNet threshold calibration, deadlines and stream
rebatching, the request server (:class:`EarlyExitServer`: stage-level continuous batching)
(its HTTP front: :mod:`ann_kernels.serve`, optional extra ``[serve]``). CLI commands ``calibrate``,
``infer`` and ``serve`` live in :mod:`.commands`."""

from ann_kernels.inference.calibration import (
    BudgetCalibration,
    calibrate_for_budget,
    calibrate_thresholds,
    geometric_exit_fractions,
    simulate_thresholds,
)
from ann_kernels.inference.engine import EarlyExitEngine
from ann_kernels.inference.results import EarlyExitResult, EarlyExitStats, ExitCalibration, ServedResult
from ann_kernels.inference.server import EarlyExitServer, ServerStats
from ann_kernels.inference.stage_timing import StageTimes

__all__ = [
    "BudgetCalibration",
    "EarlyExitEngine",
    "EarlyExitResult",
    "EarlyExitServer",
    "EarlyExitStats",
    "ExitCalibration",
    "ServedResult",
    "ServerStats",
    "StageTimes",
    "calibrate_for_budget",
    "calibrate_thresholds",
    "geometric_exit_fractions",
    "simulate_thresholds",
]
