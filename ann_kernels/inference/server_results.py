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
        """The results of the requests ``finished`` (all rows exited): one gather per result
        buffer for all of them, then per request only views and a few Python sums.

        Returns (results, rows per exit [K] summed over them, their FLOPs sum, their rows)."""
        positions = [p for r in finished for a, n in r.ranges for p in range(a, a + n)]
        index = torch.tensor(positions, dtype=torch.int64, device=self.device)
        sizes = [r.rows for r in finished]
        preds = self.prediction.index_select(0, index).split_with_sizes(sizes)  # the C++ method: no wrapper
        exits_all = self.exit_index.index_select(0, index)
        exits = exits_all.split_with_sizes(sizes)
        confs = self.confidence.index_select(0, index).split_with_sizes(sizes)
        exit_list = exits_all.tolist()
        for r in finished:
            self.release(r)
        num_exits = len(exit_flops)
        results, offset = [], 0
        totals = [0] * num_exits
        flops_sum = 0.0
        flop_of, executed_of = exit_flops.__getitem__, executed_costs.__getitem__
        for i, r in enumerate(finished):
            n = r.rows
            mine = exit_list[offset:offset + n]
            offset += n
            counts = [0] * num_exits
            for e in mine:
                counts[e] += 1
            mean = sum(map(flop_of, mine)) / n
            executed = sum(map(executed_of, mine)) / n
            reach, seconds = n, []
            for j in range(num_exits):
                seconds.append(reach * per_row_seconds[j])
                reach -= counts[j]
                totals[j] += counts[j]
            flops_sum += mean * n
            stats = EarlyExitStats(tuple(counts), mean, executed, exit_flops[-1], tuple(seconds), now - r.submitted,
                                   r.deadline_exit)
            queue_s = (r.started if r.started is not None else now) - r.submitted
            results.append(ServedResult(preds[i], exits[i], confs[i], stats, queue_s))
            r.x = None
        return results, totals, flops_sum, offset
