"""Result routing of :class:`~ann_kernels.inference.EarlyExitServer`: server-wide result
buffers that the fused exit op writes each exiting row's prediction / exit / confidence
into (at the row's position, assigned when its request first runs stage 0), and the
assembly of a finished request's :class:`~ann_kernels.inference.results.ServedResult` from
them. Used by the worker thread only."""

from __future__ import annotations

import torch

from ann_kernels.inference.results import EarlyExitStats, ServedResult
from ann_kernels.inference.rows import int64_tensor
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

    def assign(self, segments, rows: int, started: float) -> torch.Tensor:
        """Positions [rows] int64 for a stage-0 run that started at ``started``: one contiguous
        free range; each request of ``segments`` [(request, rows)] records its range (and
        ``started``, the first time its rows run)."""
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
            if n == request.rows:  # all its rows in this run
                request.start = offset
            elif request.ranges is None:
                request.ranges = [(offset, n)]
            else:
                request.ranges.append((offset, n))
            offset += n
            if request.started is None:
                request.started = started
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
        if request.start >= 0:
            occupied[request.start:request.start + request.rows] = bytes(request.rows)
        for a, n in request.ranges or ():
            occupied[a:a + n] = bytes(n)

    def collect(self, finished: list[Request], exit_flops, executed_costs, per_row_seconds, now: float):
        """The results of the requests ``finished`` (all rows exited), vectorised: one gather
        per result buffer for all of them, and one matrix product [R, K] x [K, 2 + K] for every
        request's mean and executed FLOPs and stage-time shares; per request only the views,
        two tuples and the result record (no torch call per request).

        ``exit_flops`` / ``executed_costs`` / ``per_row_seconds``: K floats each.
        Returns (results, rows per exit [K] summed over them, their FLOPs sum, their rows)."""
        num_exits, count = len(exit_flops), len(finished)
        occupied = self.occupied
        # 1. positions of all their rows, request after request (Python ints: one tensor made
        #    from them, not a tensor op per step), and each row's request times K (for 3.)
        sizes, index, owner = [], [], []
        for i, r in enumerate(finished):
            n = r.rows
            sizes.append(n)
            owner += [i * num_exits] * n
            a = r.start
            if a >= 0:
                index += range(a, a + n)
                occupied[a:a + n] = bytes(n)
            else:
                for a, m in r.ranges:
                    index += range(a, a + m)
                    occupied[a:a + m] = bytes(m)
        total = len(index)
        index_t = int64_tensor(index).to(self.device)
        # 2. one gather per buffer, split into per-request views
        preds = self.prediction.index_select(0, index_t).split_with_sizes(sizes)  # the C++ method: no wrapper
        exits_all = self.exit_index.index_select(0, index_t)
        exits = exits_all.split_with_sizes(sizes)
        confs = self.confidence.index_select(0, index_t).split_with_sizes(sizes)
        # 3. per-request exit counts [R, K]; then counts @ [exit FLOPs | executed FLOPs | seconds
        #    per row of stage j for the rows that ran it (exit j' >= j)] [K, 2 + K] in one product
        keys = int64_tensor(owner).add_(exits_all.cpu())
        counts = torch.bincount(keys, minlength=count * num_exits).view(count, num_exits)
        weights = torch.tensor([[f, e, *(s if j <= exit_j else 0.0 for j, s in enumerate(per_row_seconds))]
                                for exit_j, (f, e) in enumerate(zip(exit_flops, executed_costs))],
                               dtype=torch.float64)
        sums = (counts.double() @ weights).tolist()
        counts_l = counts.tolist()
        full = exit_flops[-1]
        results, flops_sum = [], 0.0
        # 4. per request: the records, made by tuple.__new__ (what the named tuples' generated
        #    __new__ calls, without its Python frame: this loop runs once per answer)
        make = tuple.__new__
        for r, n, c, row, p, x, q in zip(finished, sizes, counts_l, sums, preds, exits, confs):
            flops_sum += row[0]
            stats = make(EarlyExitStats, (tuple(c), row[0] / n, row[1] / n, full, tuple(row[2:]),
                                          now - r.submitted, r.deadline_exit))
            result = make(ServedResult, (p, x, q, stats))
            started = r.started
            result.queue_s = (started if started is not None else now) - r.submitted
            results.append(result)
            r.x = None
        return results, counts.sum(0).tolist(), flops_sum, total
