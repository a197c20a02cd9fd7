"""Measured stage times by batch size: the one cost model behind deadlines (do not start a
stage that would overrun) and the compaction-versus-masking choice, shared by
:class:`~ann_kernels.EarlyExitEngine`, :class:`~ann_kernels.inference.EarlyExitServer`
and :class:`~ann_kernels.EANNEngine`.

A *stage* here is whatever runs between two exit decisions (network stage k, its head
when evaluated, and the exit op). Every run records ``(stage, evaluated_head, rows,
seconds)``; rows are grouped into power-of-two buckets (1, 2-3, 4-7, ...), and each bucket
keeps an exponential moving average of its rows and its seconds, so the estimate follows
load changes within a few calls. :meth:`StageTimes.estimate` interpolates linearly between
the neighbouring measured buckets; above the largest measured bucket it scales
proportionally with the rows, below the smallest it takes the smallest bucket's time
(small batches are rarely cheaper per call than that). Both choices overestimate rather than
underestimate, which is the safe side for deadlines.

Thread safety: one lock around each bucket update (a few hundred nanoseconds); estimates
read a snapshot without the lock (a torn read only mixes two valid averages).
"""

from __future__ import annotations

import threading

__all__ = ["StageTimes", "row_bucket"]


def row_bucket(rows: int) -> int:
    """Power-of-two bucket of a batch size: 1 -> 1, 2-3 -> 2, 4-7 -> 3, 256-511 -> 9."""
    return rows.bit_length()


class StageTimes:
    """Per stage and batch-size bucket, moving averages of measured seconds.

    Args:
        num_stages: K, stages 0..K-1.
        smoothing: weight of a new measurement in the moving average (0 < smoothing <= 1).
    """

    def __init__(self, num_stages: int, smoothing: float = 0.25) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing: expected a weight in (0, 1], got {smoothing!r}")
        self.num_stages = num_stages
        self.smoothing = smoothing
        # [stage][head evaluated] -> {bucket: [mean rows, mean seconds, count]}
        self._points: list[tuple[dict, dict]] = [({}, {}) for _ in range(num_stages)]
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable / deep-copyable (models holding one can be saved)
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def record(self, stage: int, rows: int, seconds: float, head: bool = True) -> None:
        """One run of ``stage`` on ``rows`` rows took ``seconds`` (``head``: its head ran)."""
        if rows <= 0 or not seconds >= 0:
            return
        table = self._points[stage][head]
        bucket = rows.bit_length()
        with self._lock:
            point = table.get(bucket)
            if point is None:
                table[bucket] = [float(rows), float(seconds), 1]
                return
            # The first few samples of a bucket weigh more (a plain mean until 1/smoothing).
            point[2] += 1
            w = max(self.smoothing, 1.0 / point[2])
            point[0] += w * (rows - point[0])
            point[1] += w * (seconds - point[1])

    def measured(self, stage: int, rows: int, head: bool = True) -> bool:
        """Whether a batch of about ``rows`` rows (same bucket) ran ``stage`` before."""
        return rows.bit_length() in self._points[stage][head]

    def samples(self, stage: int, rows: int, head: bool = True) -> int:
        """How many runs of ``stage`` on about ``rows`` rows (same bucket) were measured."""
        point = self._points[stage][head].get(rows.bit_length())
        return 0 if point is None else point[2]

    def estimate(self, stage: int, rows: int, head: bool = True) -> float | None:
        """Estimated seconds of ``stage`` on ``rows`` rows, or None if it never ran (with
        ``head`` as given; falls back to the other head setting's measurements if only they
        exist)."""
        table = self._points[stage][head] or self._points[stage][not head]
        if not table:
            return None
        bucket = rows.bit_length()
        point = table.get(bucket)
        if point is not None:
            lo = hi = point
            # Interpolate inside the bucket toward the neighbour on rows' side.
            if rows < point[0]:
                lo = table.get(bucket - 1, point)
            elif rows > point[0]:
                hi = table.get(bucket + 1, point)
        else:
            keys = sorted(table)  # tiny: at most ~20 buckets
            below = [b for b in keys if b < bucket]
            above = [b for b in keys if b > bucket]
            lo = table[below[-1]] if below else None
            hi = table[above[0]] if above else None
            if lo is None:
                return hi[1]  # smaller than anything measured: not cheaper than the smallest
            if hi is None:
                return lo[1] * rows / lo[0]  # larger: proportional
        return _interpolate(lo, hi, rows)

    def snapshot(self) -> dict[int, dict[int, tuple[float, float]]]:
        """{stage: {bucket: (mean rows, mean seconds)}} of runs with the head evaluated (for stats)."""
        with self._lock:
            return {
                k: {b: (p[0], p[1]) for b, p in sorted(tables[True].items())}
                for k, tables in enumerate(self._points)
            }


def _interpolate(lo, hi, rows: int) -> float:
    r0, s0, r1, s1 = lo[0], lo[1], hi[0], hi[1]
    if r1 <= r0:
        return s0 if rows <= r0 else s0 * rows / r0
    if rows >= r1:
        return s1 * rows / r1
    if rows <= r0:
        return s0
    return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
