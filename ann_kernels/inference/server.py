"""``EarlyExitServer``: a request server for early exit with stage-level continuous batching.

Clients call :meth:`EarlyExitServer.submit` (any thread; returns a
``concurrent.futures.Future``) or ``await server.infer(x)`` (asyncio). One worker thread owns
the model and one queue per stage:

- a stage runs when its queue holds ``max_batch_size`` rows (deepest full stage first), or
  when its oldest row has waited ``max_wait_s`` (or, for stages after the first, at once
  when no row is queued before it: nothing could join it), or when a queued row's deadline
  needs it now; it runs on rows of many requests at once;
- after the stage and its head, the fused exit op (:mod:`ann_kernels.ops.early_exit`) writes
  the exiting rows' prediction / exit / confidence straight into server-wide result buffers
  at the rows' positions, and compacts the survivors, which join the next stage's queue;
- a request's future is resolved once all its rows have exited.

So under load new requests fill stage 0 while survivors of earlier ones fill the deeper
stages, and every stage runs at a full batch: the time-ideal speed-up of early exit becomes
reachable even where small batches are not proportionally cheaper (the MLP). Decisions
are per row (thresholds / budget mode), so each row gets what
:meth:`~ann_kernels.EarlyExitEngine.predict` gives it alone, up to float rounding at a
threshold (a batch's GEMM may round differently). ``quota`` fractions apply per stage run,
conditionally (exit k takes q_k / (1 - q_0 - ... - q_{k-1}) of the rows reaching it), so
they hold on average, not per request.

Deadlines (``submit(x, deadline_s=...)``), the rule of the engines: before a stage runs, the
rows whose deadline would pass before it finishes (its measured time at that batch size,
:class:`~ann_kernels.inference.stage_timing.StageTimes`, shared with the engine) leave at
the exit before it, the latest they reached in time; rows whose deadline passed while the
stage ran leave at that same earlier exit (exit 0 always counts).

Nothing is lost: :meth:`close` drains every queue; a stage that raises fails only the
requests whose rows it carried (their futures get the exception), and the server keeps
serving; bad input (wrong sample shape, dtype or device, empty) fails only that request's
future, with a message naming the argument.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from itertools import accumulate

import torch

from ann_kernels.inference.engine import EarlyExitEngine, EarlyExitResult, EarlyExitStats, _gather_rows
from ann_kernels.inference.engine import _with_first as _with_rest
from ann_kernels.inference.server_state import (
    ServerStats,
    _check_positive_int,
    _check_seconds,
    _Piece,
    _Request,
)
from ann_kernels.inference.stream import _concat, _split

__all__ = ["EarlyExitServer", "ServerStats"]

_MIN_CAPACITY = 4096
_LATENCY_WINDOW = 10000  # completed requests whose latencies the percentiles cover


class EarlyExitServer:
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
        self.max_batch_size = _check_positive_int(max_batch_size, "max_batch_size")
        self.max_wait_s = _check_seconds(max_wait_s, "max_wait_s", allow_none=False)
        self.num_exits = num_exits = engine.num_exits
        plan = engine._plan(1, thresholds, budget, None if quota is None else quota)
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
        self._queues: list[deque[_Piece]] = [deque() for _ in range(num_exits)]
        self._queued = [0] * num_exits
        self._deadline_pieces = [0] * num_exits  # pieces with a finite deadline per queue
        self._worker: threading.Thread | None = None
        self._closing = self._closed = False
        self._started_at = 0.0
        # result buffers (worker thread only)
        self._capacity = 0
        self._buffers = None  # (prediction, exit_index, confidence, arange)
        self._occupied = bytearray()
        self._next_position = 0
        self._step = None
        self._costs = None
        self._finished: list[_Request] = []  # completed in the current stage run
        # statistics
        self._submitted = self._completed = self._failed = self._rows_completed = 0
        self._deadline_requests = 0
        self._rows_per_exit = [0] * num_exits
        self._flops_sum = 0.0
        self._stage_runs = [0] * num_exits
        self._stage_rows = [0] * num_exits
        self._stage_seconds = [0.0] * num_exits
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

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
                            self._costs = self.engine._costs_for(example)
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
            leftovers = [p for q in self._queues for p in q]  # only if never started
            for q in self._queues:
                q.clear()
            self._queued = [0] * self.num_exits
        for piece in leftovers:
            for request, _ in piece.segments:
                self._fail(request, RuntimeError("server: closed before this request ran (never started)"))

    def __enter__(self) -> EarlyExitServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ clients
    def submit(self, x: torch.Tensor, *, deadline_s: float | None = None) -> Future:
        """Queue the batch ``x`` [n, *sample_shape] (n >= 1); returns a Future whose result is an
        :class:`~ann_kernels.inference.EarlyExitResult` with prediction / exit_index / confidence
        [n] in x's row order. ``deadline_s``: seconds from now (module docstring). Bad input
        fails the returned future (ValueError / TypeError naming the argument)."""
        submitted = time.perf_counter()
        future: Future = Future()
        future.set_running_or_notify_cancel()
        try:
            deadline_s = _check_seconds(deadline_s, "deadline_s", allow_none=True)
            self._check_input(x)
        except (TypeError, ValueError) as error:
            future.set_exception(error)
            return future
        deadline = math.inf if deadline_s is None else submitted + deadline_s
        request = _Request(future, x, submitted, deadline)
        with self._cond:
            if self._closing or self._closed:
                raise RuntimeError("server: closed; submit() after close()")
            if self._worker is None:
                raise RuntimeError("server: not started; call start() or use `with EarlyExitServer(...)`")
            if self._sample_shape is None:
                self._sample_shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != self._sample_shape:
                future.set_exception(ValueError(
                    f"x: expected samples of shape {list(self._sample_shape)} ([n, {', '.join(map(str, self._sample_shape))}]), "
                    f"got a batch of shape {list(x.shape)}"))
                return future
            self._submitted += 1
            if deadline != math.inf:
                self._deadline_requests += 1  # from now on, pieces compute their earliest deadline
            self._push(0, _Piece(x, None, [(request, request.rows)], submitted, deadline, request.rows))
            self._cond.notify()
        return future

    async def infer(self, x: torch.Tensor, *, deadline_s: float | None = None) -> EarlyExitResult:
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
                tuple(self._queued), tuple(self._stage_runs),
                tuple(r / n if n else 0.0 for r, n in zip(self._stage_rows, self._stage_runs)),
                pct(0.5), pct(0.9), pct(0.99),
                time.perf_counter() - self._started_at if self._started_at else 0.0,
            )

    # ------------------------------------------------------------------ queues (under the lock)
    def _push(self, k: int, piece: _Piece) -> None:
        self._queues[k].append(piece)
        self._queued[k] += piece.rows
        if piece.deadline != math.inf:
            self._deadline_pieces[k] += 1

    def _choose(self, now: float):
        """(stage to run now or None, seconds to wait otherwise)."""
        queued, queues, wait = self._queued, self._queues, math.inf
        for k in range(self.num_exits - 1, -1, -1):
            if queued[k] >= self.max_batch_size:
                return k, 0.0
        best, best_joined = None, math.inf
        for k in range(self.num_exits):
            if not queued[k]:
                continue
            joined = queues[k][0].joined
            due = joined + self.max_wait_s
            if self._deadline_pieces[k]:
                estimate = self.engine.stage_times.estimate(k, queued[k]) or 0.0
                due = min(due, min(p.deadline for p in queues[k]) - estimate)
            if self._closing or due <= now or (k and not any(queued[:k])):
                if joined < best_joined:
                    best, best_joined = k, joined
            else:
                wait = min(wait, due - now)
        return best, wait

    def _take(self, k: int):
        """Up to max_batch_size rows from the head of queue k: (hidden, positions, segments)."""
        queue, rows = self._queues[k], min(self.max_batch_size, self._queued[k])
        hidden_parts, position_parts, segments, taken, deadline = [], [], [], 0, math.inf
        while taken < rows:
            piece = queue.popleft()
            if piece.deadline < deadline:
                deadline = piece.deadline
            if piece.deadline != math.inf:
                self._deadline_pieces[k] -= 1
            if taken + piece.rows > rows:  # split: the rest stays at the head
                want = rows - taken
                head_segments, rest_segments, count = [], [], 0
                for request, n in piece.segments:
                    if count >= want:
                        rest_segments.append((request, n))
                    elif count + n > want:
                        head_segments.append((request, want - count))
                        rest_segments.append((request, count + n - want))
                    else:
                        head_segments.append((request, n))
                    count += n
                hidden, rest = _split(piece.hidden, want)
                positions = None if piece.positions is None else piece.positions[:want]
                rest_piece = _Piece(rest, None if piece.positions is None else piece.positions[want:],
                                    rest_segments, piece.joined, piece.deadline, piece.rows - want)
                queue.appendleft(rest_piece)
                if rest_piece.deadline != math.inf:
                    self._deadline_pieces[k] += 1
                piece = _Piece(hidden, positions, head_segments, piece.joined, piece.deadline, want)
            hidden_parts.append(piece.hidden)
            position_parts.append(piece.positions)
            segments.extend(piece.segments)
            taken += piece.rows
        self._queued[k] -= rows
        positions = None if k == 0 else _concat(position_parts)
        return _concat(hidden_parts), positions, segments, rows, deadline

    # ------------------------------------------------------------------ worker
    def _serve(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        k, wait = self._choose(time.perf_counter())
                        if k is not None:
                            break
                        if self._closing and not any(self._queued):
                            return
                        self._cond.wait(None if wait == math.inf else wait)
                    hidden, positions, segments, rows, deadline = self._take(k)
                with torch.inference_mode():
                    try:
                        self._run_stage(k, hidden, positions, segments, rows, deadline != math.inf)
                    finally:
                        self._flush_completed()
        except BaseException as error:  # an internal bug: fail everything left, never hang a client
            with self._cond:
                self._closing = True
                leftovers = [p for q in self._queues for p in q]
                for q in self._queues:
                    q.clear()
                self._queued = [0] * self.num_exits
            failure = RuntimeError(f"server: the worker stopped on an internal error: {error!r}")
            failure.__cause__ = error
            for piece in leftovers:
                for request, _ in piece.segments:
                    self._fail(request, failure)
            raise

    def _run_stage(self, k: int, hidden, positions, segments, rows: int, has_deadlines: bool) -> None:
        start = time.perf_counter()
        try:
            if k == 0:
                positions = self._assign_positions(segments, rows, hidden)
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
                prediction, exit_index, confidence, _ = self._buffers
                survivors, keep, gathered = self._step(logits, positions, primary, prediction, exit_index,
                                                       confidence, threshold, self.engine._criterion_code, k, count)
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
        return _gather_rows(hidden, keep), positions.index_select(0, keep), live, int(keep.shape[0])

    def _forward(self, k: int, hidden, positions, segments, rows: int) -> None:
        if self._failed and any(r.done for r, _ in segments):  # rows of failed requests go no further
            hidden, positions, segments, rows = self._drop_done(hidden, positions, segments)
            if not rows:
                return
        deadline = min(r.deadline for r, _ in segments) if self._deadline_requests else math.inf
        with self._cond:
            self._push(k, _Piece(hidden, positions, segments, time.perf_counter(), deadline, rows))
            self._cond.notify()

    def _route(self, k: int, out, survivors, keep, gathered, segments, rows: int) -> None:
        """After the exit op at stage k: finish the requests whose last rows left, queue the rest."""
        left = survivors.shape[0]
        if left == rows:  # nobody left
            self._forward(k + 1, gathered if isinstance(out, torch.Tensor) else _with_rest(out, gathered, keep),
                          survivors, segments, rows)
            return
        if left == 0:
            kept = [0] * len(segments)
        else:
            ends = torch.tensor(list(accumulate(n for _, n in segments)), device=keep.device)
            kept_before = torch.searchsorted(keep, ends).tolist()
            kept = [b - a for a, b in zip([0] + kept_before[:-1], kept_before)]
        survivor_segments = []
        for (request, n), s in zip(segments, kept):
            if s:
                survivor_segments.append((request, s))
            if s < n:
                request.remaining -= n - s
                if request.remaining == 0:
                    self._complete(request)
        if left:
            hidden = gathered if isinstance(out, torch.Tensor) else _with_rest(out, gathered, keep)
            self._forward(k + 1, hidden, survivors, survivor_segments, left)

    # ------------------------------------------------------------------ deadlines
    def _segment_rows(self, segments, flags) -> torch.Tensor:
        """Row numbers (in the block) of the segments whose flag is set."""
        device = self._buffers[0].device
        mask = torch.repeat_interleave(torch.tensor(flags, dtype=torch.bool),
                                       torch.tensor([n for _, n in segments]))
        return mask.nonzero().squeeze(1).to(device)

    def _exit_rows(self, exit_k: int, head_input, positions, segments, cut_at: int) -> None:
        """The rows of ``segments`` (all of ``head_input``) leave at ``exit_k``."""
        logits = self.engine.model.forward_head(exit_k, head_input)
        prediction, exit_index, confidence, _ = self._buffers
        self._step(logits, positions, None, prediction, exit_index, confidence, -math.inf,
                   self.engine._criterion_code, exit_k, -1)
        for request, n in segments:
            request.remaining -= n
            if request.deadline_exit is None:
                request.deadline_exit = cut_at
            if request.remaining == 0:
                self._complete(request)

    def _partition(self, hidden, positions, segments, late_flags):
        late_rows = self._segment_rows(segments, late_flags)
        ok_rows = self._segment_rows(segments, [not f for f in late_flags])
        late = (_gather_rows(hidden, late_rows), positions.index_select(0, late_rows),
                [s for s, f in zip(segments, late_flags) if f])
        ok = (_gather_rows(hidden, ok_rows), positions.index_select(0, ok_rows),
              [s for s, f in zip(segments, late_flags) if not f], int(ok_rows.shape[0]))
        return late, ok, late_rows, ok_rows

    def _deadline_exits(self, k: int, hidden, positions, segments, rows: int, now: float):
        """Before stage k: rows whose deadline would pass before it finishes leave at exit k - 1."""
        if not any(r.deadline != math.inf for r, _ in segments):
            return hidden, positions, segments, rows
        estimate = self.engine.stage_times.estimate(k, rows, self._thresholds[k] != math.inf) or 0.0
        flags = [r.deadline < now + estimate for r, _ in segments]
        if not any(flags):
            return hidden, positions, segments, rows
        if all(flags):
            self._exit_rows(k - 1, hidden, positions, segments, k)
            return hidden, positions, [], 0
        late, ok, _, _ = self._partition(hidden, positions, segments, flags)
        self._exit_rows(k - 1, *late, k)
        return ok

    def _late_after_stage(self, k: int, out, hidden, positions, segments, rows: int):
        """Rows whose deadline passed during stage k leave at exit k - 1 (exit 0 if k = 0)."""
        now = time.perf_counter()
        flags = [r.deadline < now for r, _ in segments]
        if not any(flags):
            return out, hidden, positions, segments, rows
        exit_k, source = (k - 1, hidden) if k else (0, out)
        if all(flags):
            self._exit_rows(exit_k, source, positions, segments, k)
            return out, hidden, positions, [], 0
        late, ok, late_rows, ok_rows = self._partition(source, positions, segments, flags)
        self._exit_rows(exit_k, *late, k)
        return _gather_rows(out, ok_rows), None, ok[1], ok[2], ok[3]

    # ------------------------------------------------------------------ buffers and results
    def _assign_positions(self, segments, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Result-buffer positions for a stage-0 run: one contiguous free range."""
        if self._buffers is None:
            device = like.device if isinstance(like, torch.Tensor) else like[0].device
            if self._costs is None:
                self._costs = self.engine._costs_for(like)  # raises first if the model rejects the input
            self._executed = _executed_costs(self._costs, self._thresholds)
            self._step = self.engine._kernels_for(device.type)[0]
            self._grow(max(_MIN_CAPACITY, 16 * self.max_batch_size), device)
        start = self._next_position
        if start + rows > self._capacity or self._occupied.find(1, start, start + rows) != -1:
            start = 0
            if rows > self._capacity or self._occupied.find(1, 0, rows) != -1:
                start = self._capacity
                self._grow(max(2 * self._capacity, self._capacity + rows), self._buffers[0].device)
        self._occupied[start:start + rows] = b"\x01" * rows
        self._next_position = start + rows
        offset = start
        for request, n in segments:
            request.ranges.append((offset, n))
            offset += n
        return self._buffers[3][start:start + rows]

    def _grow(self, capacity: int, device) -> None:
        new = (torch.empty(capacity, dtype=torch.int64, device=device),
               torch.empty(capacity, dtype=torch.int64, device=device),
               torch.empty(capacity, dtype=torch.float32, device=device),
               torch.arange(capacity, dtype=torch.int64, device=device))
        if self._buffers is not None:
            for a, b in zip(new[:3], self._buffers[:3]):
                a[: self._capacity] = b
        self._occupied.extend(bytes(capacity - self._capacity))
        self._buffers, self._capacity = new, capacity

    def _complete(self, request: _Request) -> None:
        """All rows of ``request`` have exited: resolved at the end of this stage run (in bulk)."""
        if not request.done:
            request.done = True
            self._finished.append(request)

    def _flush_completed(self) -> None:
        """Resolve the requests finished in this stage run: one gather per result buffer for
        all of them, then per request only views and a few Python sums."""
        finished, self._finished = self._finished, []
        if not finished:
            return
        prediction, exit_index, confidence, _ = self._buffers
        positions = [p for r in finished for a, n in r.ranges for p in range(a, a + n)]
        index = torch.tensor(positions, dtype=torch.int64, device=prediction.device)
        sizes = [r.rows for r in finished]
        preds = prediction.index_select(0, index).split(sizes)
        exits_all = exit_index.index_select(0, index)
        exits = exits_all.split(sizes)
        confs = confidence.index_select(0, index).split(sizes)
        exit_list = exits_all.tolist()
        occupied = self._occupied
        for r in finished:
            for a, n in r.ranges:
                occupied[a:a + n] = bytes(n)
        num_exits, flops, executed_costs = self.num_exits, self._costs.exit_flops, self._executed
        per_row = [t / n if n else 0.0 for t, n in zip(self._stage_seconds, self._stage_rows)]
        now = time.perf_counter()
        results, offset = [], 0
        totals = [0] * num_exits
        flops_sum = 0.0
        for i, r in enumerate(finished):
            n = r.rows
            counts = [0] * num_exits
            for e in exit_list[offset:offset + n]:
                counts[e] += 1
            offset += n
            mean = sum(c * f for c, f in zip(counts, flops)) / n
            executed = sum(c * f for c, f in zip(counts, executed_costs)) / n
            reach, seconds = n, []
            for j in range(num_exits):
                seconds.append(reach * per_row[j])
                reach -= counts[j]
                totals[j] += counts[j]
            flops_sum += mean * n
            stats = EarlyExitStats(tuple(counts), mean, executed, flops[-1], tuple(seconds), now - r.submitted,
                                   r.deadline_exit)
            results.append(EarlyExitResult(preds[i], exits[i], confs[i], stats))
            r.x = None
        with self._cond:
            self._completed += len(finished)
            self._rows_completed += offset
            self._flops_sum += flops_sum
            for j, c in enumerate(totals):
                self._rows_per_exit[j] += c
            self._latencies.extend(res.stats.total_seconds for res in results)
        for r, result in zip(finished, results):
            r.future.set_result(result)

    def _fail(self, request: _Request, error: BaseException) -> None:
        if request.done:
            return
        request.done = True
        request.x = None
        if self._buffers is not None:
            for a, n in request.ranges:
                self._occupied[a:a + n] = bytes(n)
        with self._cond:
            self._failed += 1
            if not self._shape_confirmed and self._sample_shape is not None:
                self._sample_shape = None  # the first shape seen never ran: do not lock it in
        request.future.set_exception(error)




def _executed_costs(costs, thresholds) -> list[float]:
    """Per exit e: FLOPs run for a row leaving there (stages 0..e, the heads evaluated)."""
    out, total = [], 0.0
    for k, (stage, head) in enumerate(zip(costs.stage_flops, costs.head_flops)):
        total += stage
        out.append(total + head)
        if thresholds[k] != math.inf:
            total += head
    return out
