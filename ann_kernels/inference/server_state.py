"""State of :mod:`ann_kernels.inference.server`: its statistics record
(:class:`ServerStats`), the per-request state (:class:`Request`), the rows waiting in a
stage queue (:class:`QueuePiece`) and the futures it answers (:class:`BurstFuture`)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import torch

__all__ = ["BurstFuture", "QueuePiece", "Request", "ServerStats", "set_results"]



def _future_states() -> tuple[str, str, str, frozenset]:
    """concurrent.futures' state values (PENDING, RUNNING, FINISHED, the done ones), read off
    real futures rather than its private module."""
    future = Future()
    pending = future._state
    future.set_running_or_notify_cancel()
    running = future._state
    future.set_result(None)
    cancelled = Future()
    cancelled.cancel()
    states = {future._state, cancelled._state}
    cancelled.set_running_or_notify_cancel()  # CANCELLED -> CANCELLED_AND_NOTIFIED
    return pending, running, future._state, frozenset(states | {cancelled._state})


_PENDING, _RUNNING, _FINISHED, _DONE = _future_states()
_NO_CALLBACKS: tuple = ()


class BurstFuture(Future):
    """A ``concurrent.futures.Future`` whose condition is shared by the futures of one
    :meth:`~ann_kernels.inference.EarlyExitServer.submit_many` call.

    A plain Future makes its own Condition (an RLock, a deque and five bound methods): ~10
    objects per request that live as long as the client holds the future, each of which the
    cyclic garbage collector scans again and again (in a saturated MLP server the collector
    cost more than the routing). Here they exist once per burst, and the list of done
    callbacks is made by the first :meth:`add_done_callback` (most futures get none).
    Everything else is the standard Future (callbacks, ``cancel``,
    ``concurrent.futures.wait``, ``asyncio.wrap_future``); since resolving any future of the
    burst wakes a thread waiting on another one, ``result`` and ``exception`` wait until their
    own future is done (the base class waits once and would report a timeout). A finished
    future answers ``result`` / ``exception`` / ``done`` without taking the lock (its state
    never changes again). ``running=True`` starts it in the RUNNING state, as
    ``set_running_or_notify_cancel`` would put it (the server's futures are running from the
    start: a request is queued at once and cannot be cancelled).
    """

    _done_callbacks = _NO_CALLBACKS  # the instance's own list once a callback is added

    def __init__(self, condition: threading.Condition, running: bool = False) -> None:
        # Future.__init__'s fields, with the shared condition
        self._condition = condition
        self._state = _RUNNING if running else _PENDING
        self._result = None
        self._exception = None
        self._waiters = []

    def done(self) -> bool:
        return self._state in _DONE  # one attribute read: atomic under the GIL, no lock needed

    def add_done_callback(self, fn) -> None:
        with self._condition:
            if self._state not in _DONE:
                self._done_callbacks = [*self._done_callbacks, fn]  # Future.add_done_callback's append
                return
        super().add_done_callback(fn)  # done: the base class calls fn now (and logs its exception)

    def _wait_done(self, timeout: float | None) -> None:
        if self._state not in _DONE:  # the common case of a client collecting answers: no wait
            with self._condition:
                self._condition.wait_for(self.done, timeout)

    def result(self, timeout: float | None = None):
        if self._state == _FINISHED and self._exception is None:
            return self._result
        self._wait_done(timeout)
        return super().result(0)  # done: the result / exception / CancelledError; else TimeoutError

    def exception(self, timeout: float | None = None):
        self._wait_done(timeout)
        return super().exception(0)


def set_results(futures, results) -> None:
    """``future.set_result(result)`` for each pair of the running :class:`BurstFuture` s
    ``futures`` and ``results``, with one lock and one ``notify_all`` per run of futures that
    share a condition (a burst) instead of one per future; the waiters of
    ``concurrent.futures.wait`` / ``as_completed`` are told as ``Future.set_result`` tells
    them, and the done callbacks run after the lock is released, in order."""
    n, i = len(futures), 0
    while i < n:
        condition, j = futures[i]._condition, i
        with condition:
            while j < n and futures[j]._condition is condition:
                future = futures[j]
                if future._state in _DONE:
                    raise RuntimeError(f"set_results: future {j} is already done ({future._state})")
                future._result, future._state = results[j], _FINISHED
                for waiter in future._waiters:
                    waiter.add_result(future)
                j += 1
            condition.notify_all()
        for future in futures[i:j]:
            if future._done_callbacks:
                future._invoke_callbacks()
        i = j

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
    seconds, inf = none), rows not yet exited, result-buffer positions, the first exit a
    deadline cut off, when its first stage run started, and whether it is resolved.

    Positions: ``start`` when all its rows ran stage 0 in one run (the common case: no list
    per request), else ``ranges``, one (first position, rows) per stage-0 run."""

    __slots__ = ("future", "x", "rows", "submitted", "deadline", "remaining", "start", "ranges", "deadline_exit",
                 "done", "started")

    def __init__(self, future: Future, x: torch.Tensor, submitted: float, deadline: float) -> None:
        self.future, self.x, self.rows = future, x, x.shape[0]
        self.submitted, self.deadline = submitted, deadline
        self.remaining = self.rows
        self.start = -1  # first position in the result buffers of its rows (one stage-0 run), -1: none
        self.ranges: list[tuple[int, int]] | None = None  # (first position, rows) per stage-0 run, if several
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

