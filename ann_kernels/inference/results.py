"""What the early-exit engines and the server return: :class:`EarlyExitResult` (per-row
predictions, exits, confidences + :class:`EarlyExitStats`), :class:`ServedResult` (the
server's, with the request's queueing time) and :class:`ExitCalibration` (held-out data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["EarlyExitResult", "EarlyExitStats", "ExitCalibration", "ServedResult"]


class EarlyExitStats(NamedTuple):
    """Statistics of one :meth:`EarlyExitEngine.predict` call (N samples, K exits).

    - ``samples_per_exit``: K ints, how many samples left at each exit.
    - ``mean_flops``: mean cost per sample, by DESIGN.md's exit accounting (exit k costs
      stages 0..k plus head k: ``MultiExitNetwork.exit_flops``); what budgets target.
    - ``executed_flops``: mean FLOPs actually run per sample: every stage a sample reached
      plus every head evaluated on it (heads of +inf exits are skipped).
    - ``full_flops``: the cost of the last exit (the full network), for ratios.
    - ``stage_seconds``: K wall-clock seconds of stage k + head k + the decision (0 if the
      stage did not run); ``total_seconds``: the whole call.
    - ``deadline_exit``: the first exit the deadline cut off (its stage not started, or
      finished late), or None; the samples still running took the exit before it (exit 0
      when it is 0).
    """

    samples_per_exit: tuple[int, ...]
    mean_flops: float
    executed_flops: float
    full_flops: float
    stage_seconds: tuple[float, ...]
    total_seconds: float
    deadline_exit: int | None = None


class EarlyExitResult(NamedTuple):
    """``prediction`` [N] int64 (argmax of the exit taken), ``exit_index`` [N] int64 (0-based
    exit), ``confidence`` [N] float32 (at that exit, by the engine's criterion), ``stats``."""

    prediction: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    stats: EarlyExitStats


class ServedResult(EarlyExitResult):
    """An :class:`EarlyExitResult` answered by :class:`~ann_kernels.inference.EarlyExitServer`
    (still a 4-tuple: unpacking and ``isinstance(r, EarlyExitResult)`` work as before), plus
    ``queue_s``: seconds from the request's submit to the start of the first stage run that
    carried any of its rows (``stats.total_seconds`` is submit to answer)."""

    queue_s: float

    def __new__(cls, prediction, exit_index, confidence, stats, queue_s: float = 0.0):
        result = super().__new__(cls, prediction, exit_index, confidence, stats)
        result.queue_s = queue_s
        return result

    def __reduce__(self):  # pickles with its queue_s (a tuple subclass would drop the attribute)
        return (ServedResult, (*self, self.queue_s))


@dataclass(frozen=True)
class ExitCalibration:
    """Held-out data stored by :meth:`EarlyExitEngine.calibrate`: ``confidence`` [K, N]
    float32 (the kernel's, by ``criterion``), ``correct`` [K, N] bool, ``exit_flops`` [K]
    float64 per-sample cost of each exit."""

    confidence: torch.Tensor
    correct: torch.Tensor
    exit_flops: torch.Tensor
    criterion: str
