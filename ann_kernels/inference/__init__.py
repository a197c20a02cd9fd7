"""Budgeted early-exit inference: the engine (stage-by-stage execution on the still-active
samples with the fused exit op), MSDNet threshold calibration, deadlines and stream
rebatching. CLI commands ``calibrate`` and ``infer`` live in :mod:`.commands`."""

from ann_kernels.inference.calibration import (
    BudgetCalibration,
    calibrate_for_budget,
    calibrate_thresholds,
    geometric_exit_fractions,
    simulate_thresholds,
)
from ann_kernels.inference.engine import EarlyExitEngine, EarlyExitResult, EarlyExitStats, ExitCalibration

__all__ = [
    "BudgetCalibration",
    "EarlyExitEngine",
    "EarlyExitResult",
    "EarlyExitStats",
    "ExitCalibration",
    "calibrate_for_budget",
    "calibrate_thresholds",
    "geometric_exit_fractions",
    "simulate_thresholds",
]
