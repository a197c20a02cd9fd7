"""``EANN``: a sequence of anytime networks run one after another (DESIGN.md, "EANN").

M members (each a :class:`~ann_kernels.nn.MultiExitNetwork`, same class count) are run in
order; member j restarts from the input x. The sequence's exits are the members' *used*
exits (``exits[j]``, default: all of member j's exits), in the order they finish::

    sequence exit g = (member j, exit k),   g = 0 .. G-1   (G = sum_j len(exits[j]))
    cost[g] = sum_{i < j} exit_flops_i[last used exit of i] + exit_flops_j[k]

(per-sample FLOPs with DESIGN.md's exit accounting: stages 0..k plus head k; each member's
own costs come from ``MultiExitNetwork.exit_flops``, i.e. ``FlopCounterMode``). The costs
increase with g, so "the latest finished exit" at a budget B is the last g with
cost[g] <= B.

Members trained with EANN-SIEVE weights have untrained first-half heads (weight 0: they are
dominated by the previous member's final exit); list only the trained exits in ``exits``
(:func:`ann_kernels.sequence.training.train_eann` does this from the loss weights).

Budgeted per-sample early exit over the sequence lives in :class:`EANNEngine`
(:mod:`ann_kernels.sequence.engine`); it uses the single-network calibration code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ann_kernels.inference.stage_timing import StageTimes
from ann_kernels.nn.multi_exit import MultiExitNetwork
from ann_kernels.ops.early_exit import exit_confidence

__all__ = ["EANN", "AnytimeResult", "BuildInfo"]

_REL_EPS = 1e-12  # budget comparisons tolerate float rounding of summed FLOPs


@dataclass(frozen=True)
class BuildInfo:
    """How :func:`ann_kernels.eann` scaled its builder: ``scale`` (the keyword grown),
    ``values`` [M] (its value per member), ``growth`` (the target cost ratio),
    ``member_kwargs`` (the full builder keywords of each member), ``member_flops`` [M]
    (measured per-sample cost of each member) and ``cost_ratios`` [M - 1] (measured
    member_flops[j] / member_flops[j - 1])."""

    scale: str
    values: tuple[int, ...]
    growth: float
    member_kwargs: tuple[dict, ...]
    member_flops: tuple[float, ...]
    cost_ratios: tuple[float, ...]


@dataclass(frozen=True)
class AnytimeResult:
    """Result of :meth:`EANN.anytime_predict` for a batch of N samples.

    Under a FLOP budget or a deadline the whole batch shares one exit (the sequence runs at
    batch granularity), so the exit is reported once:

    - ``prediction`` [N] int64 and ``confidence`` [N] float32 (max softmax probability) of
      the returned exit;
    - ``exit_index``: the sequence exit g returned; ``member`` / ``member_exit``: its (j, k);
    - ``sequence_flops``: cost[g], what an uninterrupted sequential run pays to finish g;
    - ``executed_flops``: per-sample FLOPs this call actually ran (a budget-only call runs
      member j alone up to exit k: its result equals the interrupted sequential run's);
    - ``exits_finished``: sequence exits finished (before the deadline, if any);
    - ``deadline_met``: None without a deadline; False when not even exit 0 finished in time
      (exit 0's prediction is returned anyway);
    - ``seconds``: wall-clock time of the call.
    """

    prediction: Tensor
    confidence: Tensor
    exit_index: int
    member: int
    member_exit: int
    sequence_flops: float
    executed_flops: float
    exits_finished: int
    deadline_met: bool | None
    seconds: float


def _check_members(members) -> list[MultiExitNetwork]:
    if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
        raise TypeError(f"members: expected a sequence of MultiExitNetwork, got a single {type(members).__name__}")
    if isinstance(members, (str, bytes)) or not isinstance(members, (Sequence, nn.ModuleList)):
        raise TypeError(f"members: expected a sequence of MultiExitNetwork, got {type(members).__name__}")
    members = list(members)
    if not members:
        raise ValueError("members: expected at least one MultiExitNetwork, got an empty sequence")
    classes = []
    for j, member in enumerate(members):
        if not isinstance(member, MultiExitNetwork):
            raise TypeError(f"members[{j}]: expected an ann_kernels.nn.MultiExitNetwork, got {type(member).__name__}")
        try:
            classes.append(member.num_classes)
        except RuntimeError:
            raise ValueError(f"members[{j}]: num_classes is not known; build the member with num_classes=... "
                             "(every member must predict the same classes)") from None
    if len(set(classes)) > 1:
        odd = next(j for j, c in enumerate(classes) if c != classes[0])
        raise ValueError(f"members: every member must have the same num_classes, got {classes} "
                         f"(members[{odd}] has {classes[odd]}, members[0] has {classes[0]})")
    return members


def _check_exits(exits, members: list[MultiExitNetwork]) -> tuple[tuple[int, ...], ...]:
    if exits is None:
        return tuple(tuple(range(m.num_exits)) for m in members)
    if isinstance(exits, (str, bytes)) or not isinstance(exits, Sequence):
        raise TypeError(f"exits: expected one sequence of exit indices per member, got {type(exits).__name__}")
    if len(exits) != len(members):
        raise ValueError(f"exits: expected {len(members)} entries (one per member), got {len(exits)}")
    out = []
    for j, (used, member) in enumerate(zip(exits, members)):
        if used is None:
            out.append(tuple(range(member.num_exits)))
            continue
        try:
            values = sorted({int(k) for k in used})
        except (TypeError, ValueError):
            raise TypeError(f"exits[{j}]: expected exit indices (ints), got {used!r}") from None
        if not values:
            raise ValueError(f"exits[{j}]: member {j} needs at least one used exit, got none")
        if values[0] < 0 or values[-1] >= member.num_exits:
            raise ValueError(f"exits[{j}]: indices must lie in [0, {member.num_exits}) for member {j} "
                             f"({member.num_exits} exits), got {values}")
        out.append(tuple(values))
    return tuple(out)


def _check_budget(budget, name: str = "budget") -> float:
    if isinstance(budget, Tensor):
        budget = float(budget)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"{name}: expected a finite number of FLOPs per sample, got {budget!r}")
    return float(budget)


def _check_deadline(deadline_s) -> float | None:
    if deadline_s is None:
        return None
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or math.isnan(deadline_s) \
            or deadline_s < 0:
        raise ValueError(f"deadline_s: expected seconds >= 0 or None, got {deadline_s!r}")
    return float(deadline_s)


def _check_input(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a tensor [N, ...], got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x: empty batch (shape {tuple(x.shape)}); need at least one sample")


class EANN(nn.Module):
    """A sequence of anytime networks whose costs grow (ideally exponentially), run in order.

    Args:
        members: M >= 1 :class:`~ann_kernels.nn.MultiExitNetwork` s with the same
            ``num_classes`` (cheapest first). Each takes the same input x [N, ...].
        exits: optional, one entry per member: the member's exit indices that the sequence
            uses (None or omitted: all). Unused heads are never evaluated; the member stops
            after its last used exit.
        build_info: set by :func:`ann_kernels.eann` (how the members were scaled).

    ``forward(x)`` returns the G used exits' logits in sequence order, each [N, C], so every
    helper written for a multi-exit model (e.g. ``collect_exit_outputs``) works on an EANN.
    """

    def __init__(self, members: Sequence[MultiExitNetwork], exits: Sequence[Sequence[int] | None] | None = None,
                 *, build_info: BuildInfo | None = None) -> None:
        super().__init__()
        member_list = _check_members(members)
        self.members = nn.ModuleList(member_list)
        self.exits: tuple[tuple[int, ...], ...] = _check_exits(exits, member_list)
        self.build_info = build_info
        # sequence exit g -> (member j, member exit k)
        self.exit_map: tuple[tuple[int, int], ...] = tuple(
            (j, k) for j, used in enumerate(self.exits) for k in used)
        self._used_sets = tuple(frozenset(used) for used in self.exits)
        self._last_shape: tuple[int, ...] | None = None  # input shape of the last cost measurement
        #: Measured time of each sequence exit's segment (from the previous exit to this head
        #: and its decision) by batch size: deadlines do not start a segment that would overrun.
        self.stage_times = StageTimes(self.num_exits)

    # ------------------------------------------------------------------ structure
    @property
    def num_members(self) -> int:
        """M, the number of members."""
        return len(self.members)

    @property
    def num_exits(self) -> int:
        """G, the number of sequence exits (used exits over all members)."""
        return len(self.exit_map)

    @property
    def num_classes(self) -> int:
        """C, shared by every member."""
        return self.members[0].num_classes

    def extra_repr(self) -> str:
        parts = [f"num_members={self.num_members}", f"num_exits={self.num_exits}",
                 f"num_classes={self.num_classes}", f"exits={[list(e) for e in self.exits]}"]
        if self.build_info is not None:
            info = self.build_info
            parts.append(f"scale={info.scale}={list(info.values)}")
            parts.append(f"growth={info.growth:g}")
            parts.append("member_MFLOPs=[" + ", ".join(f"{f / 1e6:.3g}" for f in info.member_flops) + "]")
            parts.append("measured_cost_ratios=[" + ", ".join(f"{r:.3f}" for r in info.cost_ratios) + "]")
        elif self._last_shape is not None:
            example = torch.zeros((1, *self._last_shape))
            flops = self.member_flops(example)
            parts.append("member_MFLOPs=[" + ", ".join(f"{f / 1e6:.3g}" for f in flops.tolist()) + "]")
            if self.num_members > 1:
                ratios = self.cost_ratios(example)
                parts.append("measured_cost_ratios=[" + ", ".join(f"{r:.3f}" for r in ratios.tolist()) + "]")
        return ", ".join(parts)

    # ------------------------------------------------------------------ costs
    def _member_costs(self, example_input: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per member: (exit_flops [K_j], stage_flops [K_j], head_flops [K_j]), float64."""
        _check_input(example_input)
        example = example_input[:1]
        self._last_shape = tuple(example.shape[1:])
        return [(m.exit_flops(example), m.stage_flops(example), m.head_flops(example)) for m in self.members]

    def member_flops(self, example_input: Tensor) -> Tensor:
        """Per-sample cost of each member alone (its last exit), float64 [M]."""
        return torch.stack([costs[0][-1] for costs in self._member_costs(example_input)])

    def cost_ratios(self, example_input: Tensor) -> Tensor:
        """Measured cost ratios member_flops[j] / member_flops[j - 1], float64 [M - 1]."""
        flops = self.member_flops(example_input)
        return flops[1:] / flops[:-1]

    def exit_flops(self, example_input: Tensor) -> Tensor:
        """Cumulative per-sample cost of each sequence exit, float64 [G] (module docstring)."""
        costs = self._member_costs(example_input)
        out, offset = [], 0.0
        for j, used in enumerate(self.exits):
            member_exit = costs[j][0]
            out.extend(offset + float(member_exit[k]) for k in used)
            offset += float(member_exit[used[-1]])
        return torch.tensor(out, dtype=torch.float64)

    def extra_cost_fraction(self, example_input: Tensor) -> float:
        """(cost of the whole sequence - cost of its largest member) / cost of the largest member."""
        total = float(self.exit_flops(example_input)[-1])
        largest = float(self.member_flops(example_input).max())
        return (total - largest) / largest

    def latest_exit(self, budget: float, example_input: Tensor) -> int:
        """The last sequence exit g with cost[g] <= ``budget``; ValueError below exit 0's cost."""
        budget = _check_budget(budget)
        flops = self.exit_flops(example_input)
        if budget < float(flops[0]) * (1 - _REL_EPS):
            raise ValueError(f"budget: {budget:.6g} FLOPs per sample is below the cheapest sequence exit "
                             f"({float(flops[0]):.6g} FLOPs); no exit can finish. The sequence's range is "
                             f"[{float(flops[0]):.6g}, {float(flops[-1]):.6g}]")
        return int((flops <= budget * (1 + _REL_EPS)).sum()) - 1

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every sequence exit, in sequence order: G tensors [N, C]."""
        logits = []
        for member, used, used_set in zip(self.members, self.exits, self._used_sets):
            h = x
            for k in range(used[-1] + 1):
                h = member.forward_stage(k, h)
                if k in used_set:
                    logits.append(member.forward_head(k, h))
        return logits

    def forward_exit(self, g: int, x: Tensor) -> Tensor:
        """Logits [N, C] of sequence exit g alone: member j runs from x up to exit k."""
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < self.num_exits:
            raise ValueError(f"g: expected a sequence exit index in [0, {self.num_exits}), got {g!r}")
        j, k = self.exit_map[g]
        member, h = self.members[j], x
        for stage in range(k + 1):
            h = member.forward_stage(stage, h)
        return member.forward_head(k, h)

    def anytime_predict(self, x: Tensor, *, budget: float | None = None,
                        deadline_s: float | None = None) -> AnytimeResult:
        """The anytime prediction of the sequence for the batch x [N, ...].

        - ``budget`` (per-sample FLOPs): the prediction of the latest sequence exit with
          cost <= budget (ValueError below exit 0's cost; above the total, the last exit).
          Without a deadline only member j runs, up to exit k: the result equals that of a
          sequential run interrupted at the budget, without the superseded work.
        - ``deadline_s`` (wall-clock seconds from the call): members run in order from the
          input, every used head is evaluated, and the call returns the prediction of the
          latest exit that finished before the deadline (stopping at the first exit that
          finishes after it, or at the budget's exit if both are given). Before each exit's
          segment the clock is checked against that segment's measured time at this batch
          size (``self.stage_times``, from earlier calls): a segment that would overrun is not
          started. Exit 0 always runs; if even it finishes late, its prediction is returned
          with ``deadline_met=False``. :class:`~ann_kernels.EANNEngine` and
          :class:`~ann_kernels.EarlyExitEngine` follow the same rule per sample.
        - neither: the last exit's prediction.

        The model must be in eval mode. Returns an :class:`AnytimeResult`.
        """
        start = time.perf_counter()
        _check_input(x)
        deadline_s = _check_deadline(deadline_s)
        if self.training:
            raise RuntimeError("model: is in training mode; anytime inference needs eann.eval()")
        if budget is not None:
            last = self.latest_exit(budget, x)
            start = time.perf_counter()  # the first call per input shape measured FLOPs: not on the clock
        else:
            last = self.num_exits - 1
        with torch.inference_mode():
            if deadline_s is None:
                logits = self.forward_exit(last, x)
                confidence, prediction = exit_confidence(logits)
                j, k = self.exit_map[last]
                seconds = time.perf_counter() - start
                stage, head = self.members[j].stage_flops(x), self.members[j].head_flops(x)
                executed = float(stage[:k + 1].sum()) + float(head[k])
                return AnytimeResult(prediction, confidence, last, j, k, float(self.exit_flops(x)[last]), executed,
                                     last + 1, None, seconds)
            return self._anytime_deadline(x, last, start + deadline_s, start)

    def _anytime_deadline(self, x: Tensor, last: int, deadline: float, start: float) -> AnytimeResult:
        latest: tuple[int, Tensor, Tensor] | None = None  # (g, prediction, confidence)
        ran: list[tuple[int, int, bool]] = []  # (member, index, is_head) of everything that ran
        g, met, finished, rows, times = 0, True, 0, x.shape[0], self.stage_times
        t_prev = time.perf_counter()
        for j, (member, used, used_set) in enumerate(zip(self.members, self.exits, self._used_sets)):
            h = x
            for k in range(used[-1] + 1):
                if latest is not None and (k == 0 or k - 1 in used_set):  # a new segment starts
                    estimate = times.estimate(g, rows)
                    if estimate is not None and t_prev + estimate > deadline:
                        g = last + 1  # it would overrun: do not start it; keep the latest exit
                        break
                h = member.forward_stage(k, h)
                ran.append((j, k, False))
                if k not in used_set:
                    continue
                logits = member.forward_head(k, h)
                ran.append((j, k, True))
                t_now = time.perf_counter()
                times.record(g, rows, t_now - t_prev)
                t_prev = t_now
                late = t_now > deadline
                if late and latest is not None:
                    g = last + 1  # stop; keep the latest exit finished in time
                    break
                confidence, prediction = exit_confidence(logits)
                latest = (g, prediction, confidence)
                if late:  # exit 0 itself finished after the deadline
                    met = False
                    g = last + 1
                    break
                finished += 1
                g += 1
                if g > last:
                    break
            if g > last:
                break
        seconds = time.perf_counter() - start
        # FLOPs after the clock: the first call per input shape measures them.
        costs = self._member_costs(x)
        executed = sum(float(costs[j][2 if is_head else 1][k]) for j, k, is_head in ran)
        g_out, prediction, confidence = latest
        j, k = self.exit_map[g_out]
        return AnytimeResult(prediction, confidence, g_out, j, k, float(self.exit_flops(x)[g_out]), executed,
                             finished, met, seconds)
