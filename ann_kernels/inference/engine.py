"""``EarlyExitEngine``: real budgeted early exit for a :class:`~ann_kernels.nn.MultiExitNetwork`.

The engine runs the network stage by stage on the still-active samples only. After stage
k it evaluates head k and makes one call of the fused op ``ann_kernels::early_exit_step``
(:mod:`ann_kernels.ops.early_exit`): confidence, decision, scatter of the exiting samples'
prediction / exit index / confidence into [N] buffers allocated once per call, and the
compacted hidden state of the rest. Per stage that is one op call and a few Python
statements; nothing per sample.

Modes (at most one of ``thresholds``, ``budget``, ``quota``; ``deadline_s`` combines with any):

- ``thresholds`` [K]: exit k takes the samples with confidence >= thresholds[k]; the last
  exit always accepts (its threshold is ignored). Exits with threshold +inf skip their head
  entirely (nobody can leave there), so all +inf gives exactly the full-depth predictions.
- ``budget``: target mean cost per sample in FLOPs; thresholds from the calibration stored
  by :meth:`EarlyExitEngine.calibrate` (:func:`~ann_kernels.inference.calibration.calibrate_for_budget`).
- ``quota`` [K] fractions (sum <= 1): exit k takes the floor(N * (q_0 + ... + q_k)) minus
  the already-exited most confident samples of the batch (a hard per-batch cost); the last
  exit takes everyone left.
- ``deadline_s``: wall-clock seconds from the call. Stage 0 and head 0 always run. Before
  stage k >= 1 the engine checks the clock against stage k's measured time at the current
  batch size (:class:`~ann_kernels.inference.stage_timing.StageTimes`, kept per stage and
  batch size from earlier calls, this engine's server included): a stage that would
  overrun is not started, and every remaining sample takes exit k - 1 (its latest computed
  exit; the head is evaluated then if its threshold had skipped it). A stage that overruns
  anyway (not measured yet, or slower than before) ends the call at its own exit.
  ``deadline_s=0`` gives exit 0 for everyone. The same rule holds in
  :class:`~ann_kernels.EANNEngine` and :class:`~ann_kernels.inference.EarlyExitServer`.
- none of them: full depth (with the deadline, an anytime prediction).

Compaction or masking: after each exit the cost model (:meth:`EarlyExitEngine._masks_next`)
either compacts the survivors (the op gathers their hidden rows) or, where the measured
stage times show that the next stage costs about as much on the whole batch as on the
survivors, runs it on the whole batch and ignores the rows that left (no gather).
Predictions are the same either way.

Thread safety: a call allocates its own buffers; the engine's caches (exit FLOPs per input
shape, thresholds per budget: LRU-bounded, keyed by calibration generation so a concurrent
:meth:`EarlyExitEngine.calibrate` can never leave stale thresholds) are filled under a lock. The model must stay in eval mode
(the constructor sets it) and is only read. Calls run under ``torch.inference_mode``.
"""

from __future__ import annotations

import math
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

import torch

from ann_kernels.inference.arguments import check_seconds, labelled_batches
from ann_kernels.inference.calibration import BudgetCalibration, calibrate_for_budget
from ann_kernels.inference.plan import ExitCosts, ExitPlan, plan_exits
from ann_kernels.inference.results import EarlyExitResult, EarlyExitStats, ExitCalibration
from ann_kernels.inference.rows import gather_rest, gather_rows
from ann_kernels.inference.stage_timing import StageTimes
from ann_kernels.inference.stream import StageQueues
from ann_kernels.nn.multi_exit import MultiExitNetwork
from ann_kernels.ops.early_exit import CRITERIA, buffers_function, exit_confidence, step_function

__all__ = ["BUDGET_CACHE_SIZE", "EarlyExitEngine", "EarlyExitResult", "EarlyExitStats", "ExitCalibration"]

_MASK_SLACK = 1.0  # mask when the whole batch measured no slower than the survivors
_MIN_SAMPLES = 3  # measurements of both batch sizes before the cost model trusts them
BUDGET_CACHE_SIZE = 256  # budgets whose thresholds stay cached (least recently used dropped)


class EarlyExitEngine:
    """Budget-aware early-exit inference for a ``MultiExitNetwork`` (see the module docstring).

    Args:
        model: a :class:`ann_kernels.nn.MultiExitNetwork`; put in eval mode here.
        criterion: confidence measure, ``max_prob`` (default), ``entropy`` or ``margin``.
    """

    def __init__(self, model: MultiExitNetwork, criterion: str = "max_prob") -> None:
        if not isinstance(model, MultiExitNetwork):
            raise TypeError(f"model: expected an ann_kernels.nn.MultiExitNetwork, got {type(model).__name__}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion: expected one of {sorted(CRITERIA)}, got {criterion!r}")
        self.model = model.eval()
        self.criterion = criterion
        self.num_exits = model.num_exits
        #: The fused exit op's code of ``criterion`` (``ann_kernels.ops.early_exit.CRITERIA``).
        self.criterion_code = CRITERIA[criterion]
        self._lock = threading.Lock()
        self._costs: dict[tuple[int, ...], ExitCosts] = {}
        # (calibration generation, budget) -> thresholds; LRU-bounded (every request may carry
        # its own budget). The generation key makes a result computed from a calibration that a
        # concurrent calibrate() replaced unreachable, so it can never be served stale.
        self._budget_cache: OrderedDict[tuple[int, float], BudgetCalibration] = OrderedDict()
        self._generation = 0
        self._calibration: ExitCalibration | None = None
        self._kernels: dict[str, tuple] = {}  # device type -> (step, buffers) callables
        #: Measured stage times by batch size (deadlines, the masking cost model, the server).
        self.stage_times = StageTimes(self.num_exits)
        #: Run the next stage on the whole batch instead of compacting when the measured stage
        #: times say compaction would not pay (see :meth:`_masks_next`); results are identical.
        self.adaptive_masking = True
        self._survival: list[float | None] = [None] * self.num_exits  # previous call's survival per exit

    # ------------------------------------------------------------------ calibration
    @property
    def calibration(self) -> ExitCalibration | None:
        """The held-out data of the last :meth:`calibrate` call (None before)."""
        return self._calibration

    def calibrate(
        self, data, targets: torch.Tensor | None = None, *, batch_size: int = 512
    ) -> ExitCalibration:
        """Run the full network on held-out data and store its per-exit confidences and
        correctness, for ``predict(budget=...)``. Never pass the test split.

        Args:
            data: inputs [N, ...] (then ``targets`` [N] int64 is required), a Dataset of
                (x, y) pairs, or an iterable of (x [n, ...], y [n]) batches (a DataLoader).
            batch_size: batch size for a tensor or a Dataset.
        """
        calibration = self.exit_outputs(data, targets, batch_size=batch_size)
        with self._lock:
            self._calibration = calibration
            self._generation += 1
            self._budget_cache.clear()
        return calibration

    def exit_outputs(
        self, data, targets: torch.Tensor | None = None, *, batch_size: int = 512
    ) -> ExitCalibration:
        """What :meth:`calibrate` measures (same arguments), without storing it: e.g. test
        confidences to evaluate thresholds with
        :func:`~ann_kernels.inference.calibration.simulate_thresholds`."""
        batches = labelled_batches(data, targets, batch_size)
        confidences, corrects, first_input = [], [], None
        with torch.inference_mode():
            for x, y in batches:
                if first_input is None:
                    first_input = x[:1]
                logits = self.model(x)
                conf_pred = [exit_confidence(z, self.criterion) for z in logits]
                confidences.append(torch.stack([c for c, _ in conf_pred]).cpu())
                y = y.to(conf_pred[0][1].device)
                corrects.append(torch.stack([p == y for _, p in conf_pred]).cpu())
        if first_input is None:
            raise ValueError("data: empty set (no samples)")
        return ExitCalibration(
            confidence=torch.cat(confidences, dim=1),
            correct=torch.cat(corrects, dim=1),
            exit_flops=torch.tensor(self.costs_for(first_input).exit_flops, dtype=torch.float64),
            criterion=self.criterion,
        )

    def calibrate_budget(self, budget: float) -> BudgetCalibration:
        """Thresholds (and held-out accuracy / cost) for a mean-FLOPs budget, from the stored
        calibration; cached per budget."""
        number = isinstance(budget, (int, float)) and not isinstance(budget, bool)
        with self._lock:
            calibration, generation = self._calibration, self._generation
            key = (generation, float(budget)) if number else None  # others: validated below, not cached
            cached = self._budget_cache.get(key) if number else None
            if cached is not None:
                self._budget_cache.move_to_end(key)
                return cached
        if calibration is None:
            raise RuntimeError(
                "budget: the engine has no calibration; call engine.calibrate(val_x, val_y) "
                "(or a validation loader) first"
            )
        result = calibrate_for_budget(
            calibration.confidence, calibration.correct, calibration.exit_flops, budget
        )
        with self._lock:
            if number and self._generation == generation:  # else a newer calibration replaced ours: do not cache
                self._budget_cache[key] = result
                while len(self._budget_cache) > BUDGET_CACHE_SIZE:
                    self._budget_cache.popitem(last=False)
        return result

    def thresholds_for_budget(self, budget: float) -> torch.Tensor:
        """[K] thresholds of :meth:`calibrate_budget`."""
        return self.calibrate_budget(budget).thresholds.clone()

    # ------------------------------------------------------------------ costs
    def exit_flops(self, example_input: torch.Tensor) -> torch.Tensor:
        """[K] float64 per-sample cost of each exit for inputs shaped like ``example_input``."""
        return torch.tensor(self.costs_for(example_input[:1]).exit_flops, dtype=torch.float64)

    def costs_for(self, x: torch.Tensor) -> ExitCosts:
        """Per-sample FLOPs of each exit / stage / head for inputs shaped like ``x`` [n, ...]
        (measured once per sample shape, cached)."""
        key = tuple(x.shape[1:])
        costs = self._costs.get(key)
        if costs is None:
            with self._lock:
                costs = self._costs.get(key)
                if costs is None:
                    example = x[:1]
                    with torch.inference_mode():
                        costs = ExitCosts(
                            tuple(self.model.exit_flops(example).tolist()),
                            tuple(self.model.stage_flops(example).tolist()),
                            tuple(self.model.head_flops(example).tolist()),
                        )
                    self._costs[key] = costs
        return costs

    # ------------------------------------------------------------------ planning
    def plan(self, n: int, thresholds=None, budget=None, quota=None) -> ExitPlan:
        """The :class:`~ann_kernels.inference.plan.ExitPlan` of a batch of ``n`` rows for at
        most one of ``thresholds`` [K], ``budget`` (resolved here from the calibration) and
        ``quota`` [K] (see the module docstring); none of them: full depth."""
        given = [
            name
            for name, value in (("thresholds", thresholds), ("budget", budget), ("quota", quota))
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: give at most one of thresholds, budget and quota")
        if budget is not None:
            thresholds = self.calibrate_budget(budget).thresholds
        return plan_exits(self.num_exits, n, thresholds, quota)

    # ------------------------------------------------------------------ inference
    def kernels_for(self, device_type: str) -> tuple:
        """(``step``, ``buffers``) functions of the fused exit op for ``device_type``."""
        kernels = self._kernels.get(device_type)
        if kernels is None:  # a benign race: every thread computes the same pair
            kernels = (step_function(device_type), buffers_function(device_type))
            self._kernels[device_type] = kernels
        return kernels

    def predict(
        self,
        x: torch.Tensor,
        *,
        thresholds=None,
        budget: float | None = None,
        quota=None,
        deadline_s: float | None = None,
    ) -> EarlyExitResult:
        """Early-exit predictions for the batch ``x`` [N, ...] (see the module docstring).

        Returns:
            :class:`EarlyExitResult` with prediction [N] int64, exit_index [N] int64,
            confidence [N] float32 (on x's device) and :class:`EarlyExitStats`.
        """
        start = time.perf_counter()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor [N, ...], got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x: empty batch (shape {tuple(x.shape)}); need at least one sample")
        if deadline_s is not None and (
            isinstance(deadline_s, bool)
            or not isinstance(deadline_s, (int, float))
            or math.isnan(deadline_s)
            or deadline_s < 0
        ):
            raise ValueError(f"deadline_s: expected seconds >= 0 or None, got {deadline_s!r}")
        if self.model.training:
            raise RuntimeError("model: is in training mode; early-exit inference needs model.eval()")
        plan = self.plan(x.shape[0], thresholds, budget, quota)
        deadline = None if deadline_s is None else start + float(deadline_s)
        if torch.is_inference_mode_enabled():
            return self._run(x, plan, deadline, start)
        with torch.inference_mode():
            return self._run(x, plan, deadline, start)

    def _run(self, x: torch.Tensor, plan: ExitPlan, deadline: float | None, start: float) -> EarlyExitResult:
        """The stage loop (under inference_mode); ``start`` is the call's perf_counter()."""
        n, num_exits = x.shape[0], self.num_exits
        step, make_buffers = self.kernels_for(x.device.type)
        model, code, times = self.model, self.criterion_code, self.stage_times
        prediction, exit_index, confidence, active = make_buffers(x, n)
        samples_per_exit = [0] * num_exits
        stage_seconds = [0.0] * num_exits
        reached = [0] * num_exits  # rows that ran stage k (masked rows included)
        evaluated = [0] * num_exits  # rows whose head k ran
        deadline_exit = None
        # h holds h_rows rows; with masking (rows_in_h not None) the active samples are its rows
        # rows_in_h, else exactly its rows. remaining = active samples.
        remaining, h, h_rows, rows_in_h = n, x, n, None
        # Locals for the hot loop: per stage it is one stage call, one head call, one op call.
        forward_stage, forward_head, record = model.forward_stage, model.forward_head, times.record
        thresholds, counts = plan.thresholds, plan.exit_counts
        clock, pos_inf, neg_inf = time.perf_counter, math.inf, -math.inf
        t_prev = clock()
        for k in range(num_exits):
            threshold, count = thresholds[k], counts[k]
            skip_head = count == 0 or (count < 0 and threshold == pos_inf)  # nobody can leave here
            if k and deadline is not None:
                estimate = times.estimate(k, h_rows, not skip_head)
                if estimate is not None and t_prev + estimate > deadline:
                    # Stage k would overrun: not started; everyone left takes exit k - 1.
                    self._take_exit(k - 1, h, rows_in_h, active, prediction, exit_index, confidence)
                    evaluated[k - 1] += h_rows
                    samples_per_exit[k - 1] += remaining
                    remaining, deadline_exit = 0, k
                    stage_seconds[k - 1] += clock() - t_prev
                    break
            h_in = h if deadline is not None else None  # the latest exit's input, for a late stage
            h = forward_stage(k, h)
            reached[k] = h_rows
            if deadline is not None and clock() >= deadline:  # stage k finished late
                deadline_exit = k
                if k:  # the latest exit finished in time is k - 1
                    record(k, h_rows, clock() - t_prev, False)
                    self._take_exit(k - 1, h_in, rows_in_h, active, prediction, exit_index, confidence)
                    evaluated[k - 1] += h_rows
                    samples_per_exit[k - 1] += remaining
                    remaining = 0
                    stage_seconds[k] = clock() - t_prev
                    break
                threshold, count, skip_head = neg_inf, -1, False  # exit 0 always counts
            if skip_head:
                t_now = clock()
                stage_seconds[k], t_prev = t_now - t_prev, t_now
                record(k, h_rows, stage_seconds[k], False)
                continue
            evaluated[k] = h_rows
            logits = forward_head(k, h)
            if rows_in_h is not None:
                logits = logits.index_select(0, rows_in_h)
            everyone = count < 0 and threshold == neg_inf
            mask = not everyone and self._masks_next(k, h_rows, remaining, thresholds)
            primary = None if (everyone or mask or rows_in_h is not None) else (
                h if isinstance(h, torch.Tensor) else h[0]
            )
            active, keep, gathered = step(
                logits, active, primary, prediction, exit_index, confidence, threshold, code, k, count
            )
            survivors = active.shape[0]
            if not everyone:
                self._survival[k] = survivors / remaining  # a benign race between threads
            samples_per_exit[k], remaining = remaining - survivors, survivors
            if remaining and not everyone:
                if mask:  # run the next stage on the whole batch; exited rows are ignored
                    rows_in_h = keep if rows_in_h is None else rows_in_h.index_select(0, keep)
                elif rows_in_h is not None:  # compact a masked batch
                    h = gather_rows(h, rows_in_h.index_select(0, keep))
                    h_rows, rows_in_h = remaining, None
                else:
                    h = gathered if isinstance(h, torch.Tensor) else gather_rest(h, gathered, keep)
                    h_rows = remaining
            t_now = clock()
            stage_seconds[k], t_prev = t_now - t_prev, t_now
            record(k, reached[k], stage_seconds[k], True)
            if remaining == 0:
                break
        total_seconds = time.perf_counter() - start
        costs = self.costs_for(x)  # after the clock: the first call per input shape measures FLOPs
        exit_flops = costs.exit_flops
        mean_flops = sum(map(operator.mul, samples_per_exit, exit_flops)) / n
        executed = sum(map(operator.mul, reached, costs.stage_flops))
        executed += sum(map(operator.mul, evaluated, costs.head_flops))
        stats = EarlyExitStats(
            tuple(samples_per_exit),
            mean_flops,
            executed / n,
            exit_flops[-1],
            tuple(stage_seconds),
            total_seconds,
            deadline_exit,
        )
        return EarlyExitResult(prediction, exit_index, confidence, stats)

    def _take_exit(self, k, h, rows_in_h, active, prediction, exit_index, confidence) -> None:
        """Every active sample leaves at exit k (head k on ``h``, the output of stage k)."""
        logits = self.model.forward_head(k, h)
        if rows_in_h is not None:
            logits = logits.index_select(0, rows_in_h)
        step = self.kernels_for(logits.device.type)[0]
        step(logits, active, None, prediction, exit_index, confidence, -math.inf, self.criterion_code, k, -1)

    def _masks_next(self, k: int, h_rows: int, remaining: int, thresholds) -> bool:
        """The cost model's choice after exit k: True = run stage k + 1 on all ``h_rows`` rows
        (masking: no gather), False = compact the survivors. From measured stage times
        (:class:`StageTimes`) at the batch sizes seen and the survival rate of the previous
        call at exit k: masks when the whole batch measured no slower than the expected
        survivors (small batches not cheaper, so the gather is pure loss). A whole-batch size
        not measured yet for stage k + 1 is tried once (exploration); compaction needs
        ``_MIN_SAMPLES`` measurements of both sizes before masking is chosen again."""
        if not self.adaptive_masking or k + 1 >= self.num_exits:
            return False
        survival = self._survival[k]
        if survival is None:
            return False
        expected = max(1, round(remaining * survival))
        if expected.bit_length() == h_rows.bit_length():
            return False  # same bucket: the measurements cannot tell them apart
        times, head = self.stage_times, thresholds[k + 1] != math.inf
        compact_samples = times.samples(k + 1, expected, head)
        if not compact_samples:
            return False
        mask_samples = times.samples(k + 1, h_rows, head)
        if not mask_samples:
            return True
        if min(compact_samples, mask_samples) < _MIN_SAMPLES:
            return False
        return times.estimate(k + 1, h_rows, head) <= _MASK_SLACK * times.estimate(k + 1, expected, head)

    def stream(
        self,
        batches: Iterable[torch.Tensor],
        *,
        thresholds=None,
        budget: float | None = None,
        quota=None,
        deadline_s: float | None = None,
        batch_size: int | None = None,
        max_wait_s: float | None = None,
    ):
        """Early exit over a stream of input batches with one queue per stage: stage k runs
        only on ``batch_size`` queued samples (default: the first batch's size), so late
        stages do not run at tiny batch sizes; the rest is flushed at the end.

        Returns an iterator of :class:`EarlyExitResult`, one per input batch, in input
        order, each yielded as soon as all its samples have exited. Predictions and exits
        equal those of :meth:`predict` with the same thresholds (decisions are per sample);
        ``stats.stage_seconds[k]`` is the batch's rows that ran stage k times the stream's
        mean time per row at stage k so far, and ``stats.total_seconds`` the batch's latency
        in the stream. ``quota`` (a per-batch cost) is not defined for a rebatched stream and
        raises.

        ``deadline_s``: seconds from the moment each input batch enters the stream; the rule of
        :meth:`predict` per row: a row whose deadline would pass before its next stage
        finishes (measured stage times) leaves at the latest exit it reached, as does a row
        whose deadline passed during a stage (exit 0 always counts). Checked whenever the
        stream runs (the generator cannot act while it waits for input or for its consumer);
        a queued row's deadline also makes its stage run without a full batch.

        ``max_wait_s`` (seconds, default None = no bound): a stage also runs on fewer than
        ``batch_size`` rows once its oldest queued row has waited that long (checked at each
        new input batch), so rows of a slow or endless stream come back without waiting for
        full batches. The generator serves one consumer thread; for many producer threads use
        :class:`~ann_kernels.inference.server.EarlyExitServer`.
        """
        if quota is not None:
            raise ValueError(
                "quota: a per-batch exit quota is not defined when batches are regrouped; "
                "use thresholds or budget with stream(), or quota with predict()"
            )
        check_seconds(deadline_s, "deadline_s", allow_none=True)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        check_seconds(max_wait_s, "max_wait_s", allow_none=True)
        if self.model.training:
            raise RuntimeError("model: is in training mode; early-exit inference needs model.eval()")
        plan = self.plan(1, thresholds, budget, None)
        return StageQueues(self, plan, batch_size, max_wait_s, deadline_s).run(batches)

