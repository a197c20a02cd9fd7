"""State of :mod:`ann_kernels.inference.server`: its statistics record
(:class:`ServerStats`), the per-request state (:class:`Request`), the rows waiting in a
stage queue (:class:`QueuePiece`) and the futures it answers (:class:`BurstFuture`)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import torch

__all__ = ["BurstFuture", "QueuePiece", "Request", "ServerStats"]

_PENDING = Future()._state  # the state a new Future starts in


class BurstFuture(Future):
    """A ``concurrent.futures.Future`` whose condition is shared by the futures of one
    :meth:`~ann_kernels.inference.EarlyExitServer.submit_many` call.

    A plain Future makes its own Condition (an RLock, a deque and five bound methods): ~10
    objects per request that live as long as the client holds the future, each of which the
    cyclic garbage collector scans again and again (in a saturated MLP server the collector
    cost more than the routing). Here they exist once per burst. Everything else is the
    standard Future (callbacks, ``cancel``, ``concurrent.futures.wait``, ``asyncio.wrap_future``);
    since resolving any future of the burst wakes a thread waiting on another one, ``result``
    and ``exception`` wait until their own future is done (the base class waits once and
    would report a timeout).
    """

    def __init__(self, condition: threading.Condition) -> None:  # Future.__init__, shared condition
        self._condition = condition
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []

    def _wait_done(self, timeout: float | None) -> None:
        if not self.done():  # the common case of a client collecting answers: no wait
            with self._condition:
                self._condition.wait_for(self.done, timeout)

    def result(self, timeout: float | None = None):
        self._wait_done(timeout)
        return super().result(0)  # done: the result / exception / CancelledError; else TimeoutError

    def exception(self, timeout: float | None = None):
        self._wait_done(timeout)
        return super().exception(0)

@dataclass(frozen=True)
class ServerStats:
    """Live statistics of an :class:`EarlyExitServer` (:meth:`EarlyExitServer.stats`).

    - ``requests_submitted`` / ``requests_completed`` / ``requests_failed`` / ``requests_in_flight``;
    - ``rows_completed``; ``rows_per_exit`` [K] (rows of completed requests per exit);
    - ``mean_flops``: mean cost per completed row (exit accounting, as ``EarlyExitStats``);
      ``full_flops``: the last exit's cost (0 before the first request);
    - ``queue_depths`` [K]: rows waiting per stage now;
    - ``stage_runs`` [K] and ``mean_batch_rows`` [K]: how often each stage ran and on how
      many rows on average;
    - ``latency_p50_s`` / ``latency_p90_s`` / ``latency_p99_s``: submit-to-result seconds of the
      last 10 000 completed requests (NaN before any);
    - ``uptime_s``: seconds since :meth:`EarlyExitServer.start`.
    """

    requests_submitted: int
    requests_completed: int
    requests_failed: int
    requests_in_flight: int
    rows_completed: int
    rows_per_exit: tuple[int, ...]
    mean_flops: float
    full_flops: float
    queue_depths: tuple[int, ...]
    stage_runs: tuple[int, ...]
    mean_batch_rows: tuple[float, ...]
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    uptime_s: float

    def as_dict(self) -> dict:
        """Plain JSON-ready dict (NaN becomes None)."""
        return {
            key: (None if isinstance(v, float) and math.isnan(v) else list(v) if isinstance(v, tuple) else v)
            for key, v in asdict(self).items()
        }


class Request:
    """One submitted batch: its future, input, submit time, absolute deadline (perf_counter
    seconds, inf = none), rows not yet exited, result-buffer ranges, the first exit a deadline
    cut off, when its first stage run started, and whether it is resolved."""

    __slots__ = ("future", "x", "rows", "submitted", "deadline", "remaining", "ranges", "deadline_exit", "done",
                 "started")

    def __init__(self, future: Future, x: torch.Tensor, submitted: float, deadline: float) -> None:
        self.future, self.x, self.rows = future, x, x.shape[0]
        self.submitted, self.deadline = submitted, deadline
        self.remaining = self.rows
        self.ranges: list[tuple[int, int]] = []  # (first position, rows) in the result buffers
        self.deadline_exit: int | None = None
        self.done = False  # resolved (result or exception)
        self.started: float | None = None  # perf_counter() of the first stage run with its rows


class QueuePiece:
    """Rows waiting in one stage queue: their hidden state, buffer positions (None before
    stage 0 assigns them), requests ``segments`` [(request, rows)] in row order, the time they
    joined the queue and their earliest deadline."""

    __slots__ = ("hidden", "positions", "segments", "joined", "deadline", "rows")

    def __init__(self, hidden, positions, segments, joined: float, deadline: float, rows: int) -> None:
        self.hidden, self.positions, self.segments = hidden, positions, segments
        self.joined, self.deadline, self.rows = joined, deadline, rows

