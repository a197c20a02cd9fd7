"""``EANNEngine``: budgeted per-sample early exit over an :class:`~ann_kernels.sequence.EANN`.

The sequence's G exits (member j, exit k), in order of cumulative cost, act like the exits
of one network: a sample leaves at the first sequence exit whose confidence reaches its
threshold; the samples still active after member j's last used exit restart member j + 1
from their inputs. A sample leaving at sequence exit g costs ``EANN.exit_flops[g]`` (the
full cost of the members before j plus member j's exit k), so the thresholds for a mean
FLOPs budget come from the same calibration code as for a single network
(:func:`ann_kernels.inference.calibrate_for_budget` on held-out confidences [G, N]), and a
call returns the same :class:`~ann_kernels.inference.EarlyExitResult` as
:class:`~ann_kernels.EarlyExitEngine`.

Execution uses the fused early-exit op (confidence, decision, scatter of the leaving
samples, compaction of the hidden state of the rest) after every used head.
"""

from __future__ import annotations

import math
import time

import torch

from ann_kernels.inference.calibration import BudgetCalibration, calibrate_for_budget
from ann_kernels.inference.engine import (
    EarlyExitResult,
    EarlyExitStats,
    ExitCalibration,
    _as_float_list,
    _labelled_batches,
)
from ann_kernels.ops.early_exit import CRITERIA, buffers_function, exit_confidence, step_function
from ann_kernels.sequence.model import EANN, _check_deadline, _check_input

__all__ = ["EANNEngine"]


class EANNEngine:
    """Budget-aware early exit over the sequence exits of ``eann`` (module docstring).

    Args:
        eann: an :class:`EANN`; put in eval mode here.
        criterion: confidence measure, ``max_prob`` (default), ``entropy`` or ``margin``.
    """

    def __init__(self, eann: EANN, criterion: str = "max_prob") -> None:
        if not isinstance(eann, EANN):
            raise TypeError(f"eann: expected an ann_kernels.EANN, got {type(eann).__name__}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion: expected one of {sorted(CRITERIA)}, got {criterion!r}")
        self.eann = eann.eval()
        self.criterion = criterion
        self._code = CRITERIA[criterion]
        self._calibration: ExitCalibration | None = None
        self._budget_cache: dict[float, BudgetCalibration] = {}

    @property
    def num_exits(self) -> int:
        """G, the number of sequence exits."""
        return self.eann.num_exits

    @property
    def calibration(self) -> ExitCalibration | None:
        """Held-out confidences [G, N], correctness [G, N] and costs [G] (None before calibrate)."""
        return self._calibration

    # ------------------------------------------------------------------ calibration
    def calibrate(self, data, targets: torch.Tensor | None = None, *, batch_size: int = 512) -> ExitCalibration:
        """Run every sequence exit on held-out data (never the test split) and store the
        confidences and correctness for ``predict(budget=...)``.

        ``data``: inputs [N, ...] with ``targets`` [N], a Dataset of (x, y) or an iterable of
        (x [n, ...], y [n]) batches.
        """
        confidences, corrects, first = [], [], None
        with torch.inference_mode():
            for x, y in _labelled_batches(data, targets, batch_size):
                first = x[:1] if first is None else first
                pairs = [exit_confidence(z, self.criterion) for z in self.eann(x)]
                confidences.append(torch.stack([c for c, _ in pairs]).cpu())
                y = y.to(pairs[0][1].device)
                corrects.append(torch.stack([p == y for _, p in pairs]).cpu())
        if first is None:
            raise ValueError("data: empty calibration set (no samples)")
        self._calibration = ExitCalibration(torch.cat(confidences, 1), torch.cat(corrects, 1),
                                            self.eann.exit_flops(first), self.criterion)
        self._budget_cache = {}
        return self._calibration

    def calibrate_budget(self, budget: float) -> BudgetCalibration:
        """Thresholds [G] with the best held-out accuracy at mean cost <= ``budget`` (cached)."""
        if self._calibration is None:
            raise RuntimeError("budget: the engine has no calibration; call engine.calibrate(val_x, val_y) first")
        key = float(budget)
        if key not in self._budget_cache:
            c = self._calibration
            self._budget_cache[key] = calibrate_for_budget(c.confidence, c.correct, c.exit_flops, key)
        return self._budget_cache[key]

    # ------------------------------------------------------------------ inference
    def predict(self, x: torch.Tensor, *, thresholds=None, budget: float | None = None,
                deadline_s: float | None = None) -> EarlyExitResult:
        """Per-sample early exit over the sequence for the batch x [N, ...].

        Args:
            thresholds: [G] per sequence exit (the last one is ignored: everyone left leaves).
            budget: target mean FLOPs per sample; thresholds from :meth:`calibrate_budget`.
            deadline_s: wall-clock seconds from the call. Exit 0 always runs; after each head,
                if the deadline has passed, every remaining sample returns the prediction of
                the latest exit that finished in time (that head's own if none did).

        Returns:
            :class:`~ann_kernels.inference.EarlyExitResult`: prediction [N] int64, exit_index
            [N] int64 (sequence exit), confidence [N] float32, and stats with G-long
            ``samples_per_exit`` / ``stage_seconds`` (time up to and including each used head).
        """
        start = time.perf_counter()
        _check_input(x)
        deadline_s = _check_deadline(deadline_s)
        if thresholds is not None and budget is not None:
            raise ValueError("thresholds and budget: give at most one of them")
        if self.eann.training:
            raise RuntimeError("eann: is in training mode; early-exit inference needs eann.eval()")
        num_exits = self.num_exits
        if budget is not None:
            thresholds = self.calibrate_budget(budget).thresholds
        if thresholds is None:
            values = [math.inf] * num_exits
        else:
            values = _as_float_list(thresholds, "thresholds")
            if len(values) != num_exits:
                raise ValueError(f"thresholds: expected {num_exits} values (one per sequence exit), got {len(values)}")
            if any(math.isnan(v) for v in values):
                raise ValueError(f"thresholds: must not contain NaN, got {values}")
        values[-1] = -math.inf
        deadline = None if deadline_s is None else start + deadline_s
        with torch.inference_mode():
            return self._run(x, values, deadline, start)

    def _run(self, x: torch.Tensor, thresholds: list[float], deadline: float | None, start: float) -> EarlyExitResult:
        eann, n, num_exits, code = self.eann, x.shape[0], self.num_exits, self._code
        step, make_buffers = step_function(x.device.type), buffers_function(x.device.type)
        prediction, exit_index, confidence, active = make_buffers(x, n)
        if deadline is not None:  # latest in-time prediction of every sample
            fb_pred, fb_exit, fb_conf = prediction.clone(), exit_index.clone(), confidence.clone()
            have_fallback = False
        stage_seconds = [0.0] * num_exits
        ran: list[tuple[int, int, int, bool]] = []  # (member, index, rows, is_head)
        remaining, g, deadline_exit = n, 0, None
        t_prev = time.perf_counter()
        for j, (member, used, used_set) in enumerate(zip(eann.members, eann.exits, eann._used_sets)):
            h = x if j == 0 else x.index_select(0, active)  # survivors restart from their inputs
            for k in range(used[-1] + 1):
                h = member.forward_stage(k, h)
                ran.append((j, k, remaining, False))
                if k not in used_set:
                    continue
                threshold = thresholds[g]
                if threshold == math.inf and deadline is None:  # nobody can leave: skip the head
                    t_now = time.perf_counter()
                    stage_seconds[g], t_prev, g = t_now - t_prev, t_now, g + 1
                    continue
                logits = member.forward_head(k, h)
                ran.append((j, k, remaining, True))
                if deadline is not None:
                    if time.perf_counter() > deadline:
                        deadline_exit = g
                        if have_fallback:
                            prediction[active] = fb_pred[active]
                            exit_index[active] = fb_exit[active]
                            confidence[active] = fb_conf[active]
                        else:  # exit 0 finished late: its own prediction
                            step(logits, active, None, prediction, exit_index, confidence, -math.inf, code, g, -1)
                        remaining = 0
                        stage_seconds[g] = time.perf_counter() - t_prev
                        break
                    conf_now, pred_now = exit_confidence(logits, self.criterion)
                    fb_pred[active], fb_conf[active], fb_exit[active] = pred_now, conf_now, g
                    have_fallback = True
                is_tensor = isinstance(h, torch.Tensor)
                everyone_leaves = threshold == -math.inf
                primary = None if everyone_leaves else (h if is_tensor else h[0])
                active, keep, gathered = step(logits, active, primary, prediction, exit_index, confidence, threshold,
                                              code, g, -1)
                remaining = active.shape[0]
                t_now = time.perf_counter()
                stage_seconds[g], t_prev, g = t_now - t_prev, t_now, g + 1
                if remaining == 0:
                    break
                if is_tensor:
                    h = gathered
                else:
                    rest = [t.index_select(0, keep) for t in h[1:]]
                    h = [gathered, *rest] if isinstance(h, list) else (gathered, *rest)
            if remaining == 0:
                break
        total_seconds = time.perf_counter() - start
        # FLOPs after the clock: the first call per input shape measures them.
        costs = eann._member_costs(x)
        seq_flops = eann.exit_flops(x)
        executed = sum(rows * float(costs[j][2 if is_head else 1][k]) for j, k, rows, is_head in ran)
        samples = torch.bincount(exit_index.cpu(), minlength=num_exits)
        mean_flops = float(seq_flops[exit_index.cpu()].mean())
        stats = EarlyExitStats(tuple(int(c) for c in samples.tolist()), mean_flops, executed / n,
                               float(seq_flops[-1]), tuple(stage_seconds), total_seconds, deadline_exit)
        return EarlyExitResult(prediction, exit_index, confidence, stats)
