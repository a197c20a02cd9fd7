"""Result routing of :class:`~ann_kernels.inference.EarlyExitServer`: server-wide result
buffers that the fused exit op writes each exiting row's prediction / exit / confidence
into (at the row's position, assigned when its request first runs stage 0), and the
assembly of a finished request's :class:`~ann_kernels.inference.results.ServedResult` from
them. Used by the worker thread only."""

from __future__ import annotations

import torch

from ann_kernels.inference.results import EarlyExitStats, ServedResult
from ann_kernels.inference.server_state import Request

__all__ = ["ResultBuffers"]

MIN_CAPACITY = 4096


class ResultBuffers:
    """prediction [C] int64, exit_index [C] int64, confidence [C] float32 and arange [C] int64
    (positions) on the model's device, with a byte map of the occupied positions; C grows by
    doubling when a stage-0 run finds no free contiguous range."""

    def __init__(self) -> None:
        self.capacity = 0
        self.prediction = self.exit_index = self.confidence = self.arange = None
        self.occupied = bytearray()
        self.next_position = 0

    @property
    def ready(self) -> bool:
        return self.prediction is not None

    @property
    def device(self) -> torch.device:
        return self.prediction.device

    def allocate(self, capacity: int, device) -> None:
        """First allocation (``capacity`` positions on ``device``)."""
        self._grow(max(MIN_CAPACITY, capacity), device)

    def assign(self, segments, rows: int) -> torch.Tensor:
        """Positions [rows] int64 for a stage-0 run: one contiguous free range; each request of
        ``segments`` [(request, rows)] records its range."""
        start = self.next_position
        if start + rows > self.capacity or self.occupied.find(1, start, start + rows) != -1:
            start = 0
            if rows > self.capacity or self.occupied.find(1, 0, rows) != -1:
                start = self.capacity
                self._grow(max(2 * self.capacity, self.capacity + rows), self.device)
        self.occupied[start:start + rows] = b"\x01" * rows
        self.next_position = start + rows
        offset = start
        for request, n in segments:
            request.ranges.append((offset, n))
            offset += n
        return self.arange[start:start + rows]

    def _grow(self, capacity: int, device) -> None:
        new = (torch.empty(capacity, dtype=torch.int64, device=device),
               torch.empty(capacity, dtype=torch.int64, device=device),
               torch.empty(capacity, dtype=torch.float32, device=device))
        if self.prediction is not None:
            for a, b in zip(new, (self.prediction, self.exit_index, self.confidence)):
                a[: self.capacity] = b
        self.occupied.extend(bytes(capacity - self.capacity))
        self.prediction, self.exit_index, self.confidence = new
        self.arange = torch.arange(capacity, dtype=torch.int64, device=device)
        self.capacity = capacity

    def release(self, request: Request) -> None:
        """Free the positions of ``request`` (answered or failed)."""
        occupied = self.occupied
        for a, n in request.ranges:
            occupied[a:a + n] = bytes(n)

    def collect(self, finished: list[Request], exit_flops, executed_costs, per_row_seconds, now: float):
        """The results of the requests ``finished`` (all rows exited), vectorised: one gather
        per result buffer for all of them, the per-request exit counts, mean and executed FLOPs
        and stage-time shares as tensor ops over all rows; per request only the views, two
        tuples and the result record.

        ``exit_flops`` / ``executed_costs`` / ``per_row_seconds``: K floats each.
        Returns (results, rows per exit [K] summed over them, their FLOPs sum, their rows)."""
        num_exits, count = len(exit_flops), len(finished)
        sizes, starts, lengths = [], [], []
        for r in finished:
            sizes.append(r.rows)
            for a, n in r.ranges:
                starts.append(a)
                lengths.append(n)
            self.release(r)
        # 1. positions of all their rows, request after request: start of its range + offset in it
        total = sum(sizes)
        lengths_t = torch.tensor(lengths, dtype=torch.int64)
        shift = torch.tensor(starts, dtype=torch.int64) - (lengths_t.cumsum(0) - lengths_t)
        index = (torch.arange(total, dtype=torch.int64) + shift.repeat_interleave(lengths_t)).to(self.device)
        # 2. one gather per buffer, split into per-request views
        preds = self.prediction.index_select(0, index).split_with_sizes(sizes)  # the C++ method: no wrapper
        exits_all = self.exit_index.index_select(0, index)
        exits = exits_all.split_with_sizes(sizes)
        confs = self.confidence.index_select(0, index).split_with_sizes(sizes)
        # 3. per-request exit counts [R, K] and what follows from them, for all requests at once
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
        owner = torch.arange(count, dtype=torch.int64).repeat_interleave(sizes_t)
        counts = torch.bincount(owner * num_exits + exits_all.cpu(), minlength=count * num_exits)
        counts = counts.view(count, num_exits)
        counts_f = counts.double()
        flops_sum = counts_f @ torch.tensor(exit_flops, dtype=torch.float64)
        executed = counts_f @ torch.tensor(executed_costs, dtype=torch.float64)
        reach = sizes_t.unsqueeze(1) - (counts.cumsum(1) - counts)  # rows that ran stage j
        seconds = reach.double() * torch.tensor(per_row_seconds, dtype=torch.float64)
        sizes_f = sizes_t.double()
        mean_l, executed_l = (flops_sum / sizes_f).tolist(), (executed / sizes_f).tolist()
        counts_l, seconds_l = counts.tolist(), seconds.tolist()
        full = exit_flops[-1]
        results = []
        for i, r in enumerate(finished):
            stats = EarlyExitStats(tuple(counts_l[i]), mean_l[i], executed_l[i], full, tuple(seconds_l[i]),
                                   now - r.submitted, r.deadline_exit)
            queue_s = (r.started if r.started is not None else now) - r.submitted
            results.append(ServedResult(preds[i], exits[i], confs[i], stats, queue_s))
            r.x = None
        return results, counts.sum(0).tolist(), float(flops_sum.sum()), total
