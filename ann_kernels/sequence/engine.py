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
import threading
import time
from collections import OrderedDict

import torch

from ann_kernels.inference import engine as engine_module
from ann_kernels.inference.arguments import as_float_list, labelled_batches
from ann_kernels.inference.calibration import BudgetCalibration, calibrate_for_budget
from ann_kernels.inference.results import EarlyExitResult, EarlyExitStats, ExitCalibration
from ann_kernels.inference.rows import gather_rest
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
        # (calibration generation, budget) -> thresholds, LRU-bounded; see EarlyExitEngine.
        self._budget_cache: OrderedDict[tuple[int, float], BudgetCalibration] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

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
            for x, y in labelled_batches(data, targets, batch_size):
                first = x[:1] if first is None else first
                pairs = [exit_confidence(z, self.criterion) for z in self.eann(x)]
                confidences.append(torch.stack([c for c, _ in pairs]).cpu())
                y = y.to(pairs[0][1].device)
                corrects.append(torch.stack([p == y for _, p in pairs]).cpu())
        if first is None:
            raise ValueError("data: empty calibration set (no samples)")
        calibration = ExitCalibration(torch.cat(confidences, 1), torch.cat(corrects, 1),
                                      self.eann.exit_flops(first), self.criterion)
        with self._lock:
            self._calibration = calibration
            self._generation += 1
            self._budget_cache.clear()
        return calibration

    def calibrate_budget(self, budget: float) -> BudgetCalibration:
        """Thresholds [G] with the best held-out accuracy at mean cost <= ``budget`` (cached)."""
        with self._lock:
            calibration, generation = self._calibration, self._generation
            key = (generation, float(budget))
            cached = self._budget_cache.get(key)
            if cached is not None:
                self._budget_cache.move_to_end(key)
                return cached
        if calibration is None:
            raise RuntimeError("budget: the engine has no calibration; call engine.calibrate(val_x, val_y) first")
        c = calibration
        result = calibrate_for_budget(c.confidence, c.correct, c.exit_flops, key[1])
        with self._lock:
            if self._generation == generation:  # a concurrent calibrate() replaced ours: do not cache
                self._budget_cache[key] = result
                while len(self._budget_cache) > engine_module.BUDGET_CACHE_SIZE:
                    self._budget_cache.popitem(last=False)
        return result

    # ------------------------------------------------------------------ inference
    def predict(self, x: torch.Tensor, *, thresholds=None, budget: float | None = None,
                deadline_s: float | None = None) -> EarlyExitResult:
        """Per-sample early exit over the sequence for the batch x [N, ...].

        Args:
            thresholds: [G] per sequence exit (the last one is ignored: everyone left leaves).
            budget: target mean FLOPs per sample; thresholds from :meth:`calibrate_budget`.
            deadline_s: wall-clock seconds from the call. Exit 0 always runs. Before each
                sequence exit's segment the clock is checked against its measured time at the
                current batch size (``eann.stage_times``, from earlier calls): a segment that
                would overrun is not started, and every remaining sample returns the
                prediction of the latest exit it reached in time (its head is evaluated then
                if a +inf threshold skipped it); one that overruns anyway ends the call the
                same way (exit 0 finishing late returns its own prediction). The same rule as
                :meth:`ann_kernels.EarlyExitEngine.predict`. ``stats.deadline_exit`` is the
                first sequence exit the deadline cut off.

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
            values = as_float_list(thresholds, "thresholds")
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
        times, clock, neg_inf = eann.stage_times, time.perf_counter, -math.inf
        prediction, exit_index, confidence, active = make_buffers(x, n)
        stage_seconds = [0.0] * num_exits
        ran: list[tuple[int, int, int, bool]] = []  # (member, index, rows, is_head)
        remaining, g, deadline_exit = n, 0, None
        latest = None  # (member, member exit, hidden of the active rows there): the latest exit reached

        def take_latest(g_now: int) -> None:  # every active sample leaves at the latest exit reached
            j_prev, k_prev, h_prev = latest
            logits = eann.members[j_prev].forward_head(k_prev, h_prev)
            ran.append((j_prev, k_prev, remaining, True))
            step(logits, active, None, prediction, exit_index, confidence, neg_inf, code, g_now - 1, -1)

        t_prev = clock()
        for j, (member, used, used_set) in enumerate(zip(eann.members, eann.exits, eann._used_sets)):
            h = x if j == 0 else x.index_select(0, active)  # survivors restart from their inputs
            for k in range(used[-1] + 1):
                if deadline is not None and latest is not None and (k == 0 or k - 1 in used_set):
                    estimate = times.estimate(g, remaining, thresholds[g] != math.inf)
                    if estimate is not None and t_prev + estimate > deadline:  # would overrun: not started
                        take_latest(g)
                        deadline_exit, remaining = g, 0
                        stage_seconds[g] = clock() - t_prev
                        break
                h = member.forward_stage(k, h)
                ran.append((j, k, remaining, False))
                if k not in used_set:
                    continue
                threshold = thresholds[g]
                if deadline is not None and latest is not None and clock() > deadline:
                    take_latest(g)  # exit g would finish late: the latest exit finished in time
                    deadline_exit, remaining = g, 0
                    stage_seconds[g] = clock() - t_prev
                    break
                if threshold == math.inf:  # nobody can leave: skip the head
                    t_now = clock()
                    stage_seconds[g], t_prev = t_now - t_prev, t_now
                    times.record(g, remaining, stage_seconds[g], False)
                    latest, g = (j, k, h), g + 1
                    continue
                logits = member.forward_head(k, h)
                ran.append((j, k, remaining, True))
                if deadline is not None and clock() > deadline:
                    if latest is not None:
                        take_latest(g)
                    else:  # exit 0 finished late: its own prediction
                        step(logits, active, None, prediction, exit_index, confidence, neg_inf, code, g, -1)
                    deadline_exit, remaining = g, 0
                    stage_seconds[g] = clock() - t_prev
                    break
                is_tensor = isinstance(h, torch.Tensor)
                everyone_leaves = threshold == neg_inf
                primary = None if everyone_leaves else (h if is_tensor else h[0])
                rows = remaining
                active, keep, gathered = step(logits, active, primary, prediction, exit_index, confidence, threshold,
                                              code, g, -1)
                remaining = active.shape[0]
                t_now = clock()
                stage_seconds[g], t_prev = t_now - t_prev, t_now
                times.record(g, rows, stage_seconds[g], True)
                if remaining == 0:
                    break
                if is_tensor:
                    h = gathered
                else:
                    h = gather_rest(h, gathered, keep)
                latest, g = (j, k, h), g + 1
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
