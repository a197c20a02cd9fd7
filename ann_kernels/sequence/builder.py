"""``eann(builder, num_members, growth)``: scale a model builder so that the measured member
costs grow geometrically.

The builder is any callable returning a :class:`~ann_kernels.nn.MultiExitNetwork` (e.g.
``ann_kernels.nn.resann``); one integer keyword of it (``scale``: a depth such as
``num_exits`` / ``depth`` / ``blocks_per_exit``, or a width such as ``width`` / ``hidden``)
is grown. Member 0 uses ``start``; member j uses the integer value whose measured cost
(``exit_flops(example_input)[-1]``, i.e. ``FlopCounterMode``) is closest, in log ratio, to
``cost_0 * growth**j``, among values above member j-1's. Costs are measured on throw-away
builds (under ``torch.random.fork_rng``, so the caller's RNG stream is untouched); the
members returned are built afterwards, once each, in order.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ann_kernels.nn.multi_exit import MultiExitNetwork
from ann_kernels.sequence.model import EANN, BuildInfo, _check_input

__all__ = ["SCALE_CANDIDATES", "default_scale", "eann"]

#: Keywords tried, in order, when ``scale`` is not given (depths first, then widths).
SCALE_CANDIDATES = ("num_exits", "depth", "blocks_per_exit", "layers_per_block", "width", "hidden", "dim",
                    "base_channels")


def _parameters(builder) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(builder).parameters)
    except (TypeError, ValueError):
        return None


def default_scale(builder: Callable[..., MultiExitNetwork]) -> str:
    """The first of :data:`SCALE_CANDIDATES` that ``builder`` accepts as a keyword."""
    params = _parameters(builder)
    if params is not None:
        for name in SCALE_CANDIDATES:
            if name in params:
                return name
    raise ValueError(f"scale: cannot guess which keyword of {getattr(builder, '__name__', builder)!r} to grow "
                     f"(none of {SCALE_CANDIDATES}); pass scale='<integer keyword>'")


def _start_value(builder, scale: str, builder_kwargs: dict, start) -> int:
    if start is None:
        if scale in builder_kwargs:
            start = builder_kwargs[scale]
        else:
            params = _parameters(builder)
            param = params.get(scale) if params is not None else None
            if param is None or param.default is inspect.Parameter.empty:
                raise ValueError(f"start: {scale!r} has no default in the builder; pass start=<int> "
                                 f"(member 0's {scale})")
            start = param.default
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"start: expected a positive int for member 0's {scale}, got {start!r}")
    return start


def eann(builder: Callable[..., MultiExitNetwork], num_members: int, growth: float = 2.0, *,
         example_input: Tensor, scale: str | None = None, start: int | None = None,
         max_value: int | None = None, exits=None, **builder_kwargs) -> EANN:
    """Build an :class:`EANN` of ``num_members`` members whose measured costs grow by ~``growth``.

    Args:
        builder: callable(**kwargs) -> MultiExitNetwork, e.g. ``ann_kernels.nn.resann``.
        num_members: M >= 1.
        growth: target cost ratio between consecutive members (> 1; the EANN paper uses 2).
        example_input: an input batch [N >= 1, ...] for the FLOP measurements (only its
            first sample is used).
        scale: the integer keyword of ``builder`` to grow (default: :func:`default_scale`).
        start: member 0's value of ``scale`` (default: ``builder_kwargs[scale]`` or the
            builder's default).
        max_value: the largest value tried (default: 64 * start * ceil(growth)^(M-1)).
        exits: passed to :class:`EANN` (per member, the exit indices the sequence uses).
        **builder_kwargs: fixed keywords for every member (e.g. ``num_classes=10, width=8``).

    Returns:
        the EANN, with ``build_info`` (scale, values, member kwargs, measured member FLOPs
        and cost ratios; also shown in its repr).

    Raises:
        ValueError: growth <= 1, num_members < 1, a bad ``scale`` / ``start``, or a scale
        that does not raise the cost enough below ``max_value``.
    """
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not math.isfinite(growth) \
            or growth <= 1:
        raise ValueError(f"growth: expected a cost ratio > 1 between consecutive members, got {growth!r}")
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"num_members: expected a positive int, got {num_members!r}")
    if not callable(builder):
        raise TypeError(f"builder: expected a callable returning a MultiExitNetwork, got {type(builder).__name__}")
    _check_input(example_input)
    example = example_input[:1]
    if scale is None:
        scale = default_scale(builder)
    elif not isinstance(scale, str):
        raise TypeError(f"scale: expected the name of an integer keyword of the builder, got {scale!r}")
    params = _parameters(builder)
    accepts_kwargs = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if params is not None and scale not in params and not accepts_kwargs:
        raise ValueError(f"scale: the builder {getattr(builder, '__name__', builder)!r} has no keyword {scale!r} "
                         f"(its keywords: {sorted(params)})")
    start = _start_value(builder, scale, builder_kwargs, start)
    if max_value is None:
        max_value = 64 * start * math.ceil(growth) ** max(num_members - 1, 0)
    fixed = {k: v for k, v in builder_kwargs.items() if k != scale}

    cache: dict[int, float] = {}

    def cost(value: int) -> float:
        if value not in cache:
            with torch.random.fork_rng(devices=[]):
                model = builder(**fixed, **{scale: value})
            if not isinstance(model, MultiExitNetwork):
                raise TypeError(f"builder: expected it to return a MultiExitNetwork, got {type(model).__name__}")
            cache[value] = float(model.exit_flops(example)[-1])
        return cache[value]

    values = [start]
    base = cost(start)
    if not base > 0:
        raise ValueError(f"scale: member 0 ({scale}={start}) measures 0 FLOPs; FlopCounterMode counts only "
                         "matmuls and convolutions, so the builder must contain some")
    for j in range(1, num_members):
        values.append(_search(cost, values[-1], base * growth ** j, max_value, scale))

    members = [builder(**fixed, **{scale: v}) for v in values]
    flops = [float(m.exit_flops(example)[-1]) for m in members]
    info = BuildInfo(scale=scale, values=tuple(values), growth=float(growth),
                     member_kwargs=tuple({**fixed, scale: v} for v in values), member_flops=tuple(flops),
                     cost_ratios=tuple(b / a for a, b in itertools.pairwise(flops)))
    result = EANN(members, exits, build_info=info)
    result.member_flops(example)  # remember the input shape (repr)
    return result


def _search(cost: Callable[[int], float], previous: int, target: float, max_value: int, scale: str) -> int:
    """The value > ``previous`` whose cost is closest to ``target`` in log ratio, assuming the
    cost grows with the value (exponential search, then bisection)."""
    floor_cost = cost(previous)
    lo, stride, value = previous, 1, previous + 1
    while cost(value) < target:
        if value >= 2 * previous + 2 and cost(value) <= floor_cost:
            raise ValueError(f"scale: the measured cost does not grow with {scale!r} "
                             f"({scale}={previous}: {floor_cost:.4g} FLOPs, {scale}={value}: {cost(value):.4g})")
        lo, stride = value, stride * 2
        value = lo + stride
        if value > max_value:
            value = max_value
            if cost(value) < target:
                raise ValueError(f"scale: {scale}={max_value} (max_value) costs {cost(value):.4g} FLOPs, below the "
                                 f"target {target:.4g}; raise max_value or scale another keyword")
            break
    hi = value
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) >= target:
            hi = mid
        else:
            lo = mid
    best = hi
    if lo > previous and abs(math.log(cost(lo) / target)) < abs(math.log(cost(hi) / target)):
        best = lo
    return best
