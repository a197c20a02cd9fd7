"""Stream rebatching for :meth:`ann_kernels.EarlyExitEngine.stream`.

Early exit shrinks a batch stage by stage, so on a stream of batches the late stages would
run at tiny batch sizes (poor utilisation, per-call overhead). Here every stage k has a FIFO
queue of (hidden state, buffer positions); stage k runs only when its queue holds
``batch_size`` samples, on exactly that many, and its survivors join queue k+1. With
``max_wait_s``, a stage also runs (on what it has) once its oldest queued row has waited
that long, checked whenever the stream gets control (each new input batch), or at once when
no row is queued before it (nothing could join it before the next input), so on a slow or
endless stream no row waits for a full batch forever. When the input ends, the queues are
flushed in stage order (partial batches).

One consumer: ``stream()`` is a generator driven by the thread that iterates it, fed by one
input iterable. For many producer threads (request handlers), use
:class:`~ann_kernels.inference.server.EarlyExitServer`, which has the same per-stage queues
behind a thread-safe ``submit``.

Results are written by the exit op straight into stream-wide output buffers (grown by
doubling, and shifted down once finished batches are handed out); a batch's results are
views of them. Every queue piece is tagged with the earliest input batch its rows may come
from; each stage consumes its queue in order and the op keeps row order, so the tags never
decrease along a queue, and batch b is complete once every queue head's tag exceeds b.
Completed batches are yielded in input order.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import NamedTuple

import torch

from ann_kernels.inference.plan import executed_costs
from ann_kernels.inference.results import EarlyExitResult, EarlyExitStats
from ann_kernels.inference.rows import concat_rows, gather_rest, gather_rows, split_rows
from ann_kernels.ops.early_exit import step_function

__all__ = ["StageQueues"]

_MIN_CAPACITY = 1024


class _PendingBatch(NamedTuple):
    number: int  # its index in the input stream
    start: int  # global position of the batch's first sample
    end: int  # one past its last
    arrived: float  # perf_counter() when it entered the stream


class StageQueues:
    """One stream run: ``StageQueues(engine, plan, batch_size).run(batches)`` yields an
    :class:`~ann_kernels.inference.engine.EarlyExitResult` per input batch, in order."""

    def __init__(self, engine, plan, batch_size: int | None, max_wait_s: float | None = None,
                 deadline_s: float | None = None) -> None:
        self.engine, self.plan, self.batch_size, self.max_wait_s = engine, plan, batch_size, max_wait_s
        self.deadline_s = deadline_s
        self.arrival = None  # [capacity] float64 perf_counter() of each row's batch (with a deadline)
        num_exits = engine.num_exits
        # Queue items: (hidden, positions [n] int64, number of the earliest input batch the rows may
        # come from, perf_counter() when they joined the queue). The tags only grow along a
        # queue, so completion needs no tensor reads.
        self.queues: list[deque] = [deque() for _ in range(num_exits)]
        self.queued = [0] * num_exits
        self.pending: deque[_PendingBatch] = deque()
        self.base = 0  # global position of buffer index 0
        self.next_start = 0  # global position of the next input sample
        self.capacity = 0
        self.prediction = self.exit_index = self.confidence = None
        self.step = self.costs = self.device = None
        self.stage_seconds = [0.0] * num_exits  # wall time of every run of stage k so far
        self.stage_rows = [0] * num_exits  # rows those runs processed

    # ------------------------------------------------------------------ driver
    def run(self, batches):
        # inference_mode only around the compute: a generator must not leak it to the consumer.
        for number, x in enumerate(batches):
            with torch.inference_mode():
                self._push_input(number, x)
                self._run_stages(flush=False)
            yield from self._completed()
        with torch.inference_mode():
            self._run_stages(flush=True)
        yield from self._completed()

    def _push_input(self, number: int, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"batches: batch {number} must be a non-empty tensor [n, ...], got {got}")
        if self.step is None:
            self.device = x.device
            self.step = step_function(x.device.type)
            self.costs = self.engine.costs_for(x)
            self.batch_size = self.batch_size or x.shape[0]
        n = x.shape[0]
        self._ensure_capacity(self.next_start + n - self.base)
        positions = torch.arange(
            self.next_start - self.base, self.next_start - self.base + n, device=self.device
        )
        now = time.perf_counter()
        if self.deadline_s is not None:
            self.arrival[self.next_start - self.base:self.next_start - self.base + n] = now
        self.queues[0].append((x, positions, number, now))
        self.queued[0] += n
        self.pending.append(_PendingBatch(number, self.next_start, self.next_start + n, time.perf_counter()))
        self.next_start += n

    def _run_stages(self, flush: bool) -> None:
        for k in range(self.engine.num_exits):
            while self.queued[k] >= self.batch_size or (self.queued[k] > 0 and (flush or self._overdue(k))):
                self._run_stage(k, min(self.batch_size, self.queued[k]))

    def _overdue(self, k: int) -> bool:
        """With ``max_wait_s``: stage k's oldest queued row has waited that long, or no row is
        queued before stage k (none could join it before the next input batch)."""
        now = time.perf_counter()
        if self.deadline_s is not None and self.pending:  # its earliest row's deadline needs it now
            tag = self.queues[k][0][2]
            arrived = self.pending[max(0, tag - self.pending[0].number)].arrived
            estimate = self.engine.stage_times.estimate(k, self.queued[k]) or 0.0
            if arrived + self.deadline_s - estimate <= now:
                return True
        if self.max_wait_s is None:
            return False
        if not any(self.queued[:k]):
            return True
        return now - self.queues[k][0][3] >= self.max_wait_s

    # ------------------------------------------------------------------ one stage run
    def _take(self, k: int, rows: int):
        """The first ``rows`` queued samples of stage k: (hidden, positions, batch tag)."""
        queue, hidden_pieces, position_pieces, taken = self.queues[k], [], [], 0
        tag = queue[0][2]
        while taken < rows:
            hidden, positions, piece_tag, joined = queue.popleft()
            n = positions.shape[0]
            if taken + n > rows:
                want = rows - taken
                hidden, rest = split_rows(hidden, want)
                queue.appendleft((rest, positions[want:], piece_tag, joined))
                positions, n = positions[:want], want
            hidden_pieces.append(hidden)
            position_pieces.append(positions)
            taken += n
        self.queued[k] -= rows
        return concat_rows(hidden_pieces), concat_rows(position_pieces), tag

    def _run_stage(self, k: int, rows: int) -> None:
        start = time.perf_counter()
        model = self.engine.model
        hidden, positions, tag = self._take(k, rows)
        threshold = self.plan.thresholds[k]
        if self.deadline_s is not None and k:  # rows that would miss their deadline in stage k
            estimate = self.engine.stage_times.estimate(k, rows, threshold != math.inf) or 0.0
            hidden, positions = self._cut(k - 1, hidden, hidden, positions, start + estimate)
            if positions.shape[0] == 0:
                return
        stage_input = hidden
        hidden = model.forward_stage(k, hidden)
        if self.deadline_s is not None:  # rows whose deadline passed during stage k
            source = stage_input if k else hidden
            hidden, positions = self._cut(max(k - 1, 0), source, hidden, positions, time.perf_counter())
            if positions.shape[0] == 0:
                return
        survivors, survivor_hidden = positions, hidden
        if threshold != math.inf:  # +inf: nobody leaves here, skip head and decision
            logits = model.forward_head(k, hidden)
            is_tensor = isinstance(hidden, torch.Tensor)
            primary = None if threshold == -math.inf else (hidden if is_tensor else hidden[0])
            survivors, keep, gathered = self.step(
                logits,
                positions,
                primary,
                self.prediction,
                self.exit_index,
                self.confidence,
                threshold,
                self.engine.criterion_code,
                k,
                -1,
            )
            if survivors.shape[0] and not is_tensor:
                gathered = gather_rest(hidden, gathered, keep)
            survivor_hidden = gathered
        if survivors.shape[0]:
            self.queues[k + 1].append((survivor_hidden, survivors, tag, time.perf_counter()))
            self.queued[k + 1] += survivors.shape[0]
        seconds = time.perf_counter() - start
        self._attribute(k, rows, seconds)
        self.engine.stage_times.record(k, rows, seconds, threshold != math.inf)

    def _cut(self, exit_k: int, head_input, hidden, positions, when: float):
        """Rows whose deadline is before ``when`` leave at ``exit_k`` (head ``exit_k`` on their
        rows of ``head_input``); returns the other rows of ``hidden`` and their positions."""
        late = self.arrival.index_select(0, positions) + self.deadline_s < when
        if not bool(late.any()):
            return hidden, positions
        late_rows, keep_rows = late.nonzero().squeeze(1), (~late).nonzero().squeeze(1)
        logits = self.engine.model.forward_head(exit_k, gather_rows(head_input, late_rows))
        self.step(logits, positions.index_select(0, late_rows), None, self.prediction, self.exit_index,
                  self.confidence, -math.inf, self.engine.criterion_code, exit_k, -1)
        if keep_rows.shape[0] == 0:
            return hidden, positions[:0]
        return gather_rows(hidden, keep_rows), positions.index_select(0, keep_rows)

    def _attribute(self, k: int, rows: int, seconds: float) -> None:
        self.stage_seconds[k] += seconds
        self.stage_rows[k] += rows

    # ------------------------------------------------------------------ buffers and results
    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, _MIN_CAPACITY)
        buffers = (
            torch.empty(capacity, dtype=torch.int64, device=self.device),
            torch.empty(capacity, dtype=torch.int64, device=self.device),
            torch.empty(capacity, dtype=torch.float32, device=self.device),
        )
        if self.prediction is not None:
            for new, old in zip(buffers, (self.prediction, self.exit_index, self.confidence)):
                new[: self.capacity] = old
        self.prediction, self.exit_index, self.confidence = buffers
        if self.deadline_s is not None:
            arrival = torch.empty(capacity, dtype=torch.float64, device=self.device)
            if self.arrival is not None:
                arrival[: self.capacity] = self.arrival
            self.arrival = arrival
        self.capacity = capacity

    def _earliest_queued_batch(self) -> float:
        """Number of the earliest input batch that may still have a queued sample (inf if none)."""
        return min((queue[0][2] for queue in self.queues if queue), default=math.inf)

    def _completed(self):
        done_before = self._earliest_queued_batch()
        results = []
        while self.pending and self.pending[0].number < done_before:
            batch = self.pending.popleft()
            lo, hi = batch.start - self.base, batch.end - self.base
            # Views, not copies: finished positions are never written again, and buffers are
            # replaced (never modified in place) when they grow or shift.
            exits = self.exit_index[lo:hi]
            counts = torch.bincount(exits, minlength=self.engine.num_exits).tolist()
            # A batch's share of stage k: its rows that ran stage k x the stream's mean time per row there.
            reached = [sum(counts[k:]) for k in range(len(counts))]
            shares = tuple(
                r * t / n if n else 0.0 for r, t, n in zip(reached, self.stage_seconds, self.stage_rows)
            )
            stats = EarlyExitStats(
                tuple(counts),
                self._mean(counts, self.costs.exit_flops),
                self._mean(counts, self._executed_costs()),
                self.costs.exit_flops[-1],
                shares,
                time.perf_counter() - batch.arrived,
                None,
            )
            results.append(EarlyExitResult(self.prediction[lo:hi], exits, self.confidence[lo:hi], stats))
        if results:
            with torch.inference_mode():
                self._shift_buffers()
        return results

    def _executed_costs(self) -> list[float]:
        """Per exit e: FLOPs run for a sample leaving there (stages 0..e, heads that ran)."""
        return executed_costs(self.costs, self.plan.thresholds)

    @staticmethod
    def _mean(counts, costs) -> float:
        n = sum(counts)
        return sum(c * f for c, f in zip(counts, costs)) / n if n else 0.0

    def _shift_buffers(self) -> None:
        """Drop the buffer prefix of batches already handed out, once it is at least half."""
        first_live = self.pending[0].start if self.pending else self.next_start
        shift = first_live - self.base
        if shift < _MIN_CAPACITY or 2 * shift < self.capacity:
            return
        live = self.next_start - first_live
        for name in ("prediction", "exit_index", "confidence") + (("arrival",) if self.deadline_s is not None else ()):
            old = getattr(self, name)
            new = torch.empty_like(old)
            new[:live] = old[shift : shift + live]
            setattr(self, name, new)
        for queue in self.queues:
            for _, positions, _, _ in queue:
                positions.sub_(shift)
        self.base = first_live
