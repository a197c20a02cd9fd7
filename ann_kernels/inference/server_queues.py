"""Stage scheduling of :class:`~ann_kernels.inference.EarlyExitServer`: one FIFO queue of
:class:`~ann_kernels.inference.server_state.QueuePiece` per stage, the rule that picks the
next stage to run, and the take of up to ``max_batch_size`` rows (splitting a piece that
straddles the batch). The server calls every method under its lock."""

from __future__ import annotations

import math
from collections import deque

from ann_kernels.inference.rows import concat_rows, split_rows
from ann_kernels.inference.server_state import QueuePiece
from ann_kernels.inference.stage_timing import StageTimes

__all__ = ["StageScheduler"]


class StageScheduler:
    """The per-stage queues of a server with ``num_exits`` stages.

    - ``queued[k]``: rows waiting for stage k;
    - :meth:`choose`: which stage runs now (or how long to wait);
    - :meth:`take`: the next batch of stage k.
    """

    def __init__(self, num_exits: int, max_batch_size: int, max_wait_s: float, stage_times: StageTimes) -> None:
        self.num_exits, self.max_batch_size, self.max_wait_s = num_exits, max_batch_size, max_wait_s
        self.stage_times = stage_times
        self.queues: list[deque[QueuePiece]] = [deque() for _ in range(num_exits)]
        self.queued = [0] * num_exits
        self.deadline_pieces = [0] * num_exits  # pieces with a finite deadline per queue

    def push(self, k: int, piece: QueuePiece) -> None:
        """Append ``piece`` to stage k's queue."""
        self.queues[k].append(piece)
        self.queued[k] += piece.rows
        if piece.deadline != math.inf:
            self.deadline_pieces[k] += 1

    def drain(self) -> list[QueuePiece]:
        """Empty every queue; returns the pieces that were waiting."""
        leftovers = [p for q in self.queues for p in q]
        for q in self.queues:
            q.clear()
        self.queued = [0] * self.num_exits
        self.deadline_pieces = [0] * self.num_exits
        return leftovers

    def choose(self, now: float, last_submit: float, closing: bool):
        """(stage to run now or None, seconds to wait otherwise).

        A stage runs when its queue holds ``max_batch_size`` rows (deepest full stage first),
        when its oldest row has waited ``max_wait_s``, when a queued row's deadline needs it
        now, for stages after the first when nothing is queued before it and no request
        arrived for ``max_wait_s`` (nothing could join it), or at once while ``closing``;
        among the due stages, the one whose oldest row joined first."""
        queued, queues, wait, max_wait_s = self.queued, self.queues, math.inf, self.max_wait_s
        for k in range(self.num_exits - 1, -1, -1):
            if queued[k] >= self.max_batch_size:
                return k, 0.0
        best, best_joined = None, math.inf
        for k in range(self.num_exits):
            if not queued[k]:
                continue
            joined = queues[k][0].joined
            due = joined + max_wait_s
            if self.deadline_pieces[k]:
                estimate = self.stage_times.estimate(k, queued[k]) or 0.0
                due = min(due, min(p.deadline for p in queues[k]) - estimate)
            if k and not any(queued[:k]):  # nothing can join from upstream: run once arrivals pause
                due = min(due, last_submit + max_wait_s)
            if closing or due <= now:
                if joined < best_joined:
                    best, best_joined = k, joined
            else:
                wait = min(wait, due - now)
        return best, wait

    def take(self, k: int):
        """Up to ``max_batch_size`` rows from the head of queue k: (hidden, positions (None at
        stage 0), segments [(request, rows)], rows, earliest deadline)."""
        queue, rows = self.queues[k], min(self.max_batch_size, self.queued[k])
        hidden_parts, position_parts, segments, taken, deadline = [], [], [], 0, math.inf
        while taken < rows:
            piece = queue.popleft()
            if piece.deadline < deadline:
                deadline = piece.deadline
            if piece.deadline != math.inf:
                self.deadline_pieces[k] -= 1
            if taken + piece.rows > rows:  # split: the rest stays at the head
                piece = self._split_head(k, piece, rows - taken)
            hidden_parts.append(piece.hidden)
            position_parts.append(piece.positions)
            segments.extend(piece.segments)
            taken += piece.rows
        self.queued[k] -= rows
        positions = None if k == 0 else concat_rows(position_parts)
        return concat_rows(hidden_parts), positions, segments, rows, deadline

    def _split_head(self, k: int, piece: QueuePiece, want: int) -> QueuePiece:
        """The first ``want`` rows of ``piece``; the rest goes back to the head of queue k.
        Walks only the segments up to the cut (a burst's piece may hold thousands)."""
        segments, count, i = piece.segments, 0, 0
        while count + segments[i][1] <= want:
            count += segments[i][1]
            i += 1
        head_segments, rest_segments = segments[:i], segments[i:]
        if count < want:  # the cut falls inside segment i: it is split between the two
            request, n = segments[i]
            head_segments.append((request, want - count))
            rest_segments[0] = (request, count + n - want)
        hidden, rest = split_rows(piece.hidden, want)
        positions = None if piece.positions is None else piece.positions[:want]
        rest_piece = QueuePiece(rest, None if piece.positions is None else piece.positions[want:],
                                rest_segments, piece.joined, piece.deadline, piece.rows - want)
        self.queues[k].appendleft(rest_piece)
        if rest_piece.deadline != math.inf:
            self.deadline_pieces[k] += 1
        return QueuePiece(hidden, positions, head_segments, piece.joined, piece.deadline, want)
