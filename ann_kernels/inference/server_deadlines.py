"""Deadline exits of :class:`~ann_kernels.inference.EarlyExitServer` (the engines' rule): before
stage k runs, the rows whose deadline would pass before it finishes (its measured time at that
batch size) leave at exit k - 1; after it, the rows whose deadline passed while it ran leave
at that same earlier exit (exit 0 always counts). A mixin of the server: its methods use the
server's engine, result buffers, exit op and request bookkeeping, on the worker thread."""

from __future__ import annotations

import math
import time

import torch

from ann_kernels.inference.rows import gather_rows

__all__ = ["DeadlineExits"]


class DeadlineExits:
    """The server's deadline handling (see the module docstring); segments are
    [(request, rows)] in row order, positions the rows' result-buffer positions."""

    def _segment_rows(self, segments, flags) -> torch.Tensor:
        """Row numbers (in the block) of the segments whose flag is set."""
        device = self._results.device
        mask = torch.repeat_interleave(torch.tensor(flags, dtype=torch.bool),
                                       torch.tensor([n for _, n in segments]))
        return mask.nonzero().squeeze(1).to(device)

    def _exit_rows(self, exit_k: int, head_input, positions, segments, cut_at: int) -> None:
        """The rows of ``segments`` (all of ``head_input``) leave at ``exit_k``."""
        logits = self.engine.model.forward_head(exit_k, head_input)
        buffers = self._results
        self._step(logits, positions, None, buffers.prediction, buffers.exit_index, buffers.confidence, -math.inf,
                   self.engine.criterion_code, exit_k, -1)
        for request, n in segments:
            self._exited_in_run += n
            request.remaining -= n
            if request.deadline_exit is None:
                request.deadline_exit = cut_at
            if request.remaining == 0:
                self._complete(request)

    def _partition(self, hidden, positions, segments, late_flags):
        late_rows = self._segment_rows(segments, late_flags)
        ok_rows = self._segment_rows(segments, [not f for f in late_flags])
        late = (gather_rows(hidden, late_rows), positions.index_select(0, late_rows),
                [s for s, f in zip(segments, late_flags) if f])
        ok = (gather_rows(hidden, ok_rows), positions.index_select(0, ok_rows),
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
        return gather_rows(out, ok_rows), None, ok[1], ok[2], ok[3]
