"""``EarlyExitServer``: a request server for early exit with stage-level continuous batching.

Clients call :meth:`EarlyExitServer.submit` (any thread; returns a
``concurrent.futures.Future``) or ``await server.infer(x)`` (asyncio). One worker thread owns
the model and one queue per stage:

- a stage runs when its queue holds ``max_batch_size`` rows (deepest full stage first), or
  when its oldest row has waited ``max_wait_s`` (or, for stages after the first, when no row
  is queued before it and no request arrived for ``max_wait_s``: nothing could join it), or
  when a queued row's deadline needs it now; it runs on rows of many requests at once;
- after the stage and its head, the fused exit op (:mod:`ann_kernels.ops.early_exit`) writes
  the exiting rows' prediction / exit / confidence straight into server-wide result buffers
  at the rows' positions, and compacts the survivors, which join the next stage's queue;
- a request's future is resolved once all its rows have exited.

So under load new requests fill stage 0 while survivors of earlier ones fill the deeper
stages, and every stage runs at a full batch: the time-ideal speed-up of early exit becomes
reachable even where small batches are not proportionally cheaper (the MLP). Decisions
are per row (thresholds / budget mode), so each row gets what
:meth:`~ann_kernels.EarlyExitEngine.predict` gives it alone, with one tie rule: a row whose
confidence lies within float rounding (a few ulps, ~1e-7 relative in float32) of a threshold
may exit one stage apart between a batched and an unbatched run, because a GEMM at another
batch size rounds differently. Calibrated thresholds
(:func:`~ann_kernels.inference.calibration.calibrate_thresholds`) sit in the gap between two
calibration samples, so the calibration data itself is never on a threshold. ``quota`` fractions apply per stage run,
conditionally (exit k takes q_k / (1 - q_0 - ... - q_{k-1}) of the rows reaching it), so
they hold on average, not per request.

Deadlines (``submit(x, deadline_s=...)``), the rule of the engines: before a stage runs, the
rows whose deadline would pass before it finishes (its measured time at that batch size,
:class:`~ann_kernels.inference.stage_timing.StageTimes`, shared with the engine) leave at
the exit before it, the latest they reached in time; rows whose deadline passed while the
stage ran leave at that same earlier exit (exit 0 always counts).

Observation (for metrics): :meth:`EarlyExitServer.add_stage_listener` (called after every
stage run with its stage, rows, exited rows and seconds), :meth:`EarlyExitServer.stats`,
:meth:`EarlyExitServer.queued_rows`, :meth:`EarlyExitServer.in_flight`, and each answer's
``queue_s`` (:class:`~ann_kernels.inference.results.ServedResult`).

Layout: this module takes requests in (submit, checks, lifecycle, statistics) and runs the
stages (deadlines included); :mod:`.server_queues` schedules the stage queues; :mod:`.server_deadlines` makes the rows whose
deadline would pass (or passed) during a stage leave at the exit before it;
:mod:`.server_results` owns the result buffers and assembles each request's answer;
:mod:`.server_state` holds the request state and the futures a burst shares a condition in
(:class:`~ann_kernels.inference.server_state.BurstFuture`).

Nothing is lost: :meth:`close` drains every queue; a stage that raises fails only the
requests whose rows it carried (their futures get the exception), and the server keeps
serving; bad input (wrong sample shape, dtype or device, empty) fails only that request's
future, with a message naming the argument.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ann_kernels.inference.arguments import check_positive_int, check_seconds
from ann_kernels.inference.engine import EarlyExitEngine
from ann_kernels.inference.plan import executed_costs
from ann_kernels.inference.results import ServedResult
from ann_kernels.inference.rows import gather_rest, gather_rows
from ann_kernels.inference.server_deadlines import DeadlineExits
from ann_kernels.inference.server_queues import StageScheduler
from ann_kernels.inference.server_results import ResultBuffers
from ann_kernels.inference.server_state import BurstFuture, QueuePiece, Request, ServerStats, set_results

__all__ = ["EarlyExitServer", "ServedResult", "ServerStats"]

logger = logging.getLogger(__name__)

#: fn(stage, batch_rows, exited_rows, seconds), called by the worker after every stage run.
StageListener = Callable[[int, int, int, float], None]

_FLUSH_REQUESTS = 32  # finished requests answered together (fewer: when idle or after max_wait_s)
_LATENCY_WINDOW = 10000  # completed requests whose latencies the percentiles cover


class EarlyExitServer(DeadlineExits):
    """Stage-level continuous batching over an :class:`~ann_kernels.EarlyExitEngine` (module docstring).

    Args:
        engine: the engine (its model, criterion, calibration and stage timings are used).
        thresholds / budget / quota: at most one, as in :meth:`EarlyExitEngine.predict`
            (none: full depth, i.e. plain dynamic batching). ``budget`` is resolved to
            thresholds once, here.
        max_batch_size: most rows per stage run.
        max_wait_s: longest a row waits in a stage queue for a fuller batch.
        sample_shape: the shape of one sample; default: taken from the first request that
            runs stage 0 successfully (until then, from the first one submitted). Given, the
            model's FLOPs are measured in :meth:`start`, so the first request does not wait
            for them.
    """

    def __init__(self, engine: EarlyExitEngine, *, thresholds=None, budget: float | None = None, quota=None,
                 max_batch_size: int = 256, max_wait_s: float = 0.002,
                 sample_shape: tuple[int, ...] | None = None) -> None:
        if not isinstance(engine, EarlyExitEngine):
            raise TypeError(f"engine: expected an ann_kernels.EarlyExitEngine, got {type(engine).__name__}")
        self.engine = engine
        self.max_batch_size = check_positive_int(max_batch_size, "max_batch_size")
        self.max_wait_s = check_seconds(max_wait_s, "max_wait_s", allow_none=False)
        self.num_exits = num_exits = engine.num_exits
        plan = engine.plan(1, thresholds, budget, None if quota is None else quota)
        self._thresholds = plan.thresholds
        self._quota = None
        if quota is not None:  # conditional fraction of the rows reaching exit k
            fractions = [float(q) for q in (quota.tolist() if isinstance(quota, torch.Tensor) else quota)]
            left, conditional = 1.0, []
            for q in fractions[:-1]:
                conditional.append(q / left if left > 1e-12 else 1.0)
                left -= q
            self._quota = tuple(conditional) + (1.0,)
            self._thresholds = (-math.inf,) * num_exits
        parameter = next(iter(engine.model.parameters()), None)
        self._device = parameter.device if parameter is not None else None
        self._dtype = parameter.dtype if parameter is not None else None
        self._sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self._shape_confirmed = sample_shape is not None
        self._cond = threading.Condition()
        self._scheduler = StageScheduler(num_exits, self.max_batch_size, self.max_wait_s, engine.stage_times)
        self._worker: threading.Thread | None = None
        self._closing = self._closed = False
        self._started_at = 0.0
        self._results = ResultBuffers()  # worker thread only
        self._step = None
        self._executed = None  # executed FLOPs per exit, once the costs are known
        self._costs = None
        self._finished: list[Request] = []  # all rows exited, answer not sent yet
        self._finished_since = 0.0  # perf_counter() when the oldest of them finished
        # statistics
        self._submitted = self._completed = self._failed = self._rows_completed = 0
        self._deadline_requests = 0
        self._last_submit = 0.0
        self._rows_per_exit = [0] * num_exits
        self._flops_sum = 0.0
        self._stage_runs = [0] * num_exits
        self._stage_rows = [0] * num_exits
        self._stage_seconds = [0.0] * num_exits
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._listeners: list[StageListener] = []
        self._failed_listeners: set[int] = set()  # ids of listeners whose exception was logged
        self._exited_in_run = 0  # rows that got their answer in the current stage run

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EarlyExitServer:
        """Start the worker thread (idempotent while running)."""
        with self._cond:
            if self._closed or self._closing:
                raise RuntimeError("server: closed; create a new EarlyExitServer")
            if self._worker is None:
                if self.engine.model.training:
                    raise RuntimeError("model: is in training mode; early-exit inference needs model.eval()")
                if self._sample_shape is not None:  # FLOP counting now, not in the first request
                    try:
                        example = torch.zeros((1, *self._sample_shape), dtype=self._dtype or torch.float32,
                                              device=self._device)
                        with torch.inference_mode():
                            self._costs = self.engine.costs_for(example)
                    except Exception:  # noqa: BLE001  a wrong sample_shape: the first request reports it
                        self._costs = None
                self._started_at = time.perf_counter()
                self._worker = threading.Thread(target=self._serve, name="EarlyExitServer", daemon=True)
                self._worker.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish every submitted one (result or exception), stop
        the worker. ``timeout``: seconds to wait for the drain (None: as long as it takes)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
            if worker.is_alive():
                raise TimeoutError(f"close: the queues did not drain within timeout={timeout!r} s")
        with self._cond:
            self._closed = True
            leftovers = self._scheduler.drain()  # only if never started
        for piece in leftovers:
            for request, _ in piece.segments:
                self._fail(request, RuntimeError("server: closed before this request ran (never started)"))

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample that requests are checked against: the ``sample_shape``
        given, else the one learnt from the first request (None until then). Read-only."""
        return self._sample_shape

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called (no new requests; the queued ones still finish)."""
        return self._closing

    @property
    def closed(self) -> bool:
        """True once :meth:`close` returned (the worker stopped; every request answered)."""
        return self._closed

    def __enter__(self) -> EarlyExitServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ clients
    def submit(self, x: torch.Tensor, *, deadline_s: float | None = None) -> Future:
        """Queue the batch ``x`` [n, *sample_shape] (n >= 1); returns a Future whose result is a
        :class:`~ann_kernels.inference.ServedResult` (an ``EarlyExitResult`` + ``queue_s``) with
        prediction / exit_index / confidence [n] in x's row order. ``deadline_s``: seconds from
        now (module docstring). Bad input fails the returned future (ValueError / TypeError
        naming the argument)."""
        return self.submit_many((x,), deadline_s=deadline_s)[0]

    def submit_many(self, xs, *, deadline_s: float | None = None) -> list[Future]:
        """Queue many requests at once: ``xs`` a sequence of batches [n_i, *sample_shape];
        returns one Future per batch, in order, each answered exactly as :meth:`submit` would
        answer that batch alone (rows are decided one by one). One lock, one concatenation
        and one queue entry for all of them: the vectorised intake for bursts (an HTTP front
        that drains its socket, a batch job). Bad input fails only its own future;
        ``deadline_s`` (seconds from now) applies to each request."""
        submitted = time.perf_counter()
        xs = list(xs)
        condition = threading.Condition()  # one for the burst (BurstFuture), running from the start
        futures = [BurstFuture(condition, True) for _ in xs]
        try:
            deadline_s = check_seconds(deadline_s, "deadline_s", allow_none=True)
        except ValueError as error:
            for future in futures:
                future.set_exception(error)
            return futures
        deadline = math.inf if deadline_s is None else submitted + deadline_s
        # 1. checks: a tensor of the model's exact type, dtype and device and of the known
        #    sample shape passes on attribute compares; anything else takes _check_input
        dtype, device, shape = self._dtype, self._device, self._sample_shape
        fast = dtype is not None and device is not None and shape is not None
        requests, segments, rows = [], [], 0
        for x, future in zip(xs, futures):
            size = x.shape if type(x) is torch.Tensor else None
            if not (fast and size and size[0] and size[1:] == shape and x.dtype == dtype and x.device == device):
                try:
                    self._check_input(x)
                except (TypeError, ValueError) as error:
                    future.set_exception(error)
                    continue
            request = Request(future, x, submitted, deadline)
            requests.append(request)
            segments.append((request, request.rows))
            rows += request.rows
        # 2. one lock, one concatenation, one queue piece
        with self._cond:
            if self._closing or self._closed:
                raise RuntimeError("server: closed; submit() after close()")
            if self._worker is None:
                raise RuntimeError("server: not started; call start() or use `with EarlyExitServer(...)`")
            if requests and self._sample_shape is None:
                self._sample_shape = tuple(requests[0].x.shape[1:])
            if shape is None or self._sample_shape != shape:  # checked against another shape (or none)
                accepted = []
                for request in requests:
                    if request.x.shape[1:] == self._sample_shape:
                        accepted.append(request)
                    else:
                        expected = self._sample_shape
                        request.future.set_exception(ValueError(
                            f"x: expected samples of shape {list(expected)} ([n, {', '.join(map(str, expected))}]), "
                            f"got a batch of shape {list(request.x.shape)}"))
                if len(accepted) < len(requests):
                    segments = [(r, r.rows) for r in accepted]
                    rows = sum(r.rows for r in accepted)
                requests = accepted
            if not requests:
                return futures
            self._submitted += len(requests)
            self._last_submit = submitted
            if deadline != math.inf:
                self._deadline_requests += len(requests)  # from now on, pieces compute their earliest deadline
            hidden = requests[0].x if len(requests) == 1 else torch.cat([r.x for r in requests])
            self._scheduler.push(0, QueuePiece(hidden, None, segments, submitted, deadline, rows))
            self._cond.notify()
        return futures

    async def infer(self, x: torch.Tensor, *, deadline_s: float | None = None) -> ServedResult:
        """``await server.infer(x)``: :meth:`submit` for asyncio callers."""
        return await asyncio.wrap_future(self.submit(x, deadline_s=deadline_s))

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor [n, *sample_shape], got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x: expected a non-empty batch [n, *sample_shape] (n >= 1), got shape {list(x.shape)}")
        if self._dtype is not None and x.dtype != self._dtype:
            raise TypeError(f"x: expected dtype {self._dtype} (the model's), got {x.dtype}")
        if self._dtype is None and not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if self._device is not None and x.device != self._device:
            raise ValueError(f"x: expected a tensor on {self._device} (the model's device), got {x.device}")
        if self._sample_shape is not None and tuple(x.shape[1:]) != self._sample_shape:
            raise ValueError(
                f"x: expected samples of shape {list(self._sample_shape)}, got a batch of shape {list(x.shape)}")

    # ------------------------------------------------------------------ statistics
    def stats(self) -> ServerStats:
        """A consistent snapshot of the live statistics (:class:`ServerStats`)."""
        with self._cond:
            latencies = sorted(self._latencies)
            rows = self._rows_completed

            def pct(q: float) -> float:
                return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else math.nan

            return ServerStats(
                self._submitted, self._completed, self._failed, self._submitted - self._completed - self._failed,
                rows, tuple(self._rows_per_exit), self._flops_sum / rows if rows else 0.0,
                self._costs.exit_flops[-1] if self._costs is not None else 0.0,
                tuple(self._scheduler.queued), tuple(self._stage_runs),
                tuple(r / n if n else 0.0 for r, n in zip(self._stage_rows, self._stage_runs)),
                pct(0.5), pct(0.9), pct(0.99),
                time.perf_counter() - self._started_at if self._started_at else 0.0,
            )

    def queued_rows(self) -> int:
        """Rows waiting in the stage queues now (all stages)."""
        with self._cond:
            return sum(self._scheduler.queued)

    def in_flight(self) -> int:
        """Requests accepted and not answered yet (neither a result nor an exception)."""
        with self._cond:
            return self._submitted - self._completed - self._failed

    def add_stage_listener(self, fn: StageListener) -> None:
        """Call ``fn(stage: int, batch_rows: int, exited_rows: int, seconds: float)`` from the
        worker thread after every stage run (``batch_rows``: rows taken from the queue,
        ``exited_rows``: rows of it that got their answer there, deadline exits included;
        ``seconds``: the run's wall time), e.g. for metrics. Keep it cheap: it runs on the
        serving thread. An exception in ``fn`` is logged once (per listener) and otherwise
        ignored; serving goes on."""
        if not callable(fn):
            raise TypeError(f"fn: expected a callable fn(stage, batch_rows, exited_rows, seconds), got {fn!r}")
        with self._cond:
            self._listeners = [*self._listeners, fn]  # copy-on-write: the worker reads it without the lock

    def _notify_listeners(self, k: int, rows: int, exited: int, seconds: float) -> None:
        for fn in self._listeners:
            try:
                fn(k, rows, exited, seconds)
            except Exception:  # noqa: BLE001  a listener never breaks serving
                if id(fn) not in self._failed_listeners:
                    self._failed_listeners.add(id(fn))
                    logger.exception("EarlyExitServer: stage listener %r raised (logged once; serving goes on)", fn)

    # ------------------------------------------------------------------ worker
    def _serve(self) -> None:
        scheduler = self._scheduler
        try:
            while True:
                with self._cond:
                    while True:
                        k, wait = scheduler.choose(time.perf_counter(), self._last_submit, self._closing)
                        if k is not None or self._finished:  # a stage to run, or answers to send first
                            break
                        if self._closing and not any(scheduler.queued):
                            return
                        self._cond.wait(None if wait == math.inf else wait)
                    if k is not None:
                        hidden, positions, segments, rows, deadline = scheduler.take(k)
                if k is None:  # nothing runnable now: answer the finished requests before waiting
                    with torch.inference_mode():
                        self._flush_completed()
                    continue
                start = time.perf_counter()
                self._exited_in_run = 0
                with torch.inference_mode():
                    self._run_stage(k, hidden, positions, segments, rows, deadline != math.inf, start)
                    # Answers go out in bulk: once enough requests finished, once the oldest has
                    # waited max_wait_s, or (above) as soon as no stage is runnable.
                    finished = self._finished
                    if finished and (len(finished) >= _FLUSH_REQUESTS
                                     or time.perf_counter() - self._finished_since >= self.max_wait_s):
                        self._flush_completed()
                if self._listeners:
                    self._notify_listeners(k, rows, self._exited_in_run, time.perf_counter() - start)
        except BaseException as error:  # an internal bug: fail everything left, never hang a client
            try:
                with torch.inference_mode():
                    self._flush_completed()  # their rows all exited: their answers are in the buffers
            except BaseException as flush_error:  # noqa: BLE001
                for request in self._finished:
                    request.future.set_exception(flush_error)
                self._finished = []
            with self._cond:
                self._closing = True
                leftovers = self._scheduler.drain()
            failure = RuntimeError(f"server: the worker stopped on an internal error: {error!r}")
            failure.__cause__ = error
            for piece in leftovers:
                for request, _ in piece.segments:
                    self._fail(request, failure)
            raise

    def _run_stage(self, k: int, hidden, positions, segments, rows: int, has_deadlines: bool,
                   start: float) -> None:
        try:
            if k == 0:
                positions = self._assign_positions(segments, rows, hidden, start)
            else:
                if self._failed and any(r.done for r, _ in segments):  # rows of failed requests: dropped
                    hidden, positions, segments, rows = self._drop_done(hidden, positions, segments)
                    if not rows:
                        return
                if has_deadlines:
                    hidden, positions, segments, rows = self._deadline_exits(k, hidden, positions, segments, rows,
                                                                             start)
                    if not rows:
                        return
            model, num_exits = self.engine.model, self.num_exits
            out = model.forward_stage(k, hidden)
            if has_deadlines:  # deadlines that passed during the stage
                out, hidden, positions, segments, rows = self._late_after_stage(
                    k, out, hidden, positions, segments, rows)
                if not rows:
                    return
            threshold = self._thresholds[k] if k < num_exits - 1 else -math.inf
            count = -1
            if self._quota is not None and k < num_exits - 1:
                count = min(rows, math.floor(rows * self._quota[k] + 1e-9))
            evaluated = not (threshold == math.inf and count < 0)
            if not evaluated:
                self._forward(k + 1, out, positions, segments, rows)
            else:
                logits = model.forward_head(k, out)
                everyone = threshold == -math.inf and count < 0
                primary = None if everyone else (out if isinstance(out, torch.Tensor) else out[0])
                buffers = self._results
                survivors, keep, gathered = self._step(logits, positions, primary, buffers.prediction,
                                                       buffers.exit_index, buffers.confidence, threshold,
                                                       self.engine.criterion_code, k, count)
                self._route(k, out, survivors, keep, gathered, segments, rows)
        except Exception as error:  # noqa: BLE001  the stage failed: only its requests fail
            if k == 0 and not self._shape_confirmed:
                shape = list(self._sample_shape or ())
                wrapped = ValueError(f"x: the model failed on samples of shape {shape} (the first shape this "
                                     f"server saw; pass sample_shape= to fix the shape): {error}")
                wrapped.__cause__ = error
                error = wrapped
            for request, _ in segments:
                self._fail(request, error)
            return
        seconds = time.perf_counter() - start
        if k == 0 and not self._shape_confirmed:
            self._shape_confirmed = True
        self.engine.stage_times.record(k, rows, seconds, evaluated)
        self._stage_runs[k] += 1
        self._stage_rows[k] += rows
        self._stage_seconds[k] += seconds

    def _drop_done(self, hidden, positions, segments):
        flags = [not r.done for r, _ in segments]
        if not any(flags):
            return hidden, positions, [], 0
        keep = self._segment_rows(segments, flags)
        live = [s for s, f in zip(segments, flags) if f]
        return gather_rows(hidden, keep), positions.index_select(0, keep), live, int(keep.shape[0])

    def _forward(self, k: int, hidden, positions, segments, rows: int) -> None:
        if self._failed and any(r.done for r, _ in segments):  # rows of failed requests go no further
            hidden, positions, segments, rows = self._drop_done(hidden, positions, segments)
            if not rows:
                return
        deadline = min(r.deadline for r, _ in segments) if self._deadline_requests else math.inf
        with self._cond:  # no notify: the worker (this thread) is the condition's only waiter
            self._scheduler.push(k, QueuePiece(hidden, positions, segments, time.perf_counter(), deadline, rows))

    def _route(self, k: int, out, survivors, keep, gathered, segments, rows: int) -> None:
        """After the exit op at stage k: finish the requests whose last rows left, queue the rest."""
        left = survivors.shape[0]
        self._exited_in_run += rows - left
        if left == rows:  # nobody left
            self._forward(k + 1, gathered if isinstance(out, torch.Tensor) else gather_rest(out, gathered, keep),
                          survivors, segments, rows)
            return
        # Per request: its rows kept = survivors (sorted row numbers in the block) before the
        # end of its segment, by bisection in one pass over the segments (Python ints: a
        # stage run carries tens of requests, so a tensor op per step would cost more).
        keep_rows = keep.tolist()
        survivor_segments = []
        end = before = 0
        for segment in segments:
            request, n = segment
            end += n
            after = bisect_left(keep_rows, end, before)
            s = after - before
            before = after
            if s == n:
                survivor_segments.append(segment)
                continue
            if s:
                survivor_segments.append((request, s))
            request.remaining -= n - s
            if request.remaining == 0:
                self._complete(request)
        if left:
            hidden = gathered if isinstance(out, torch.Tensor) else gather_rest(out, gathered, keep)
            self._forward(k + 1, hidden, survivors, survivor_segments, left)

    # ------------------------------------------------------------------ buffers and results
    def _assign_positions(self, segments, rows: int, like, start: float) -> torch.Tensor:
        """Result-buffer positions for a stage-0 run started at ``start`` (the buffers are made
        on the first)."""
        if not self._results.ready:
            device = like.device if isinstance(like, torch.Tensor) else like[0].device
            if self._costs is None:
                self._costs = self.engine.costs_for(like)  # raises first if the model rejects the input
            self._executed = executed_costs(self._costs, self._thresholds)
            self._step = self.engine.kernels_for(device.type)[0]
            self._results.allocate(16 * self.max_batch_size, device)
        return self._results.assign(segments, rows, start)

    def _complete(self, request: Request) -> None:
        """All rows of ``request`` have exited: resolved at the end of this stage run (in bulk)."""
        if not request.done:
            request.done = True
            if not self._finished:
                self._finished_since = time.perf_counter()
            self._finished.append(request)

    def _flush_completed(self) -> None:
        """Answer the finished requests, all at once (:meth:`ResultBuffers.collect`)."""
        finished, self._finished = self._finished, []
        if not finished:
            return
        per_row = [t / n if n else 0.0 for t, n in zip(self._stage_seconds, self._stage_rows)]
        results, totals, flops_sum, rows = self._results.collect(
            finished, self._costs.exit_flops, self._executed, per_row, time.perf_counter())
        with self._cond:
            self._completed += len(finished)
            self._rows_completed += rows
            self._flops_sum += flops_sum
            for j, c in enumerate(totals):
                self._rows_per_exit[j] += c
            self._latencies.extend(res.stats.total_seconds for res in results)
        set_results([r.future for r in finished], results)  # one lock and one wake-up per burst

    def _fail(self, request: Request, error: BaseException) -> None:
        if request.done:
            return
        request.done = True
        request.x = None
        if self._results.ready:
            self._results.release(request)
        with self._cond:
            self._failed += 1
            if not self._shape_confirmed and self._sample_shape is not None:
                self._sample_shape = None  # the first shape seen never ran: do not lock it in
        request.future.set_exception(error)
