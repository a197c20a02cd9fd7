"""Gradient equilibrium (GE; Li et al., "Improved Techniques for Training Adaptive Deep
Networks", ICCV 2019): rescale the gradient between the stages of a
:class:`~ann_kernels.nn.MultiExitNetwork` so that later exits do not drown earlier ones.

With K stages (0-based k), IMTA's rescaling is, in the forward pass of stage k::

    h = rescale(h, K - k)      on stage k's input, for k >= 1   (the path from stage k-1)
    h = stage_k(h)
    h = rescale(h, 1 / (K - k)) on stage k's output            (feeds head k and stage k+1)

``rescale(h, s)`` is the identity forward and multiplies the gradient by s. For a multi-scale
state (a tuple/list of maps, finest first, as :func:`~ann_kernels.nn.msdnet`'s) only the
coarsest scale, the last element, is rescaled, exactly as IMTA does (kalviny/IMTA
``models/msdnet_ge.py``, ``MSDNet.forward``: ``x[-1] = gradient_rescale(x[-1], 1.0 /
(nBlocks - i))`` after block i, ``x[-1] = gradient_rescale(x[-1], nBlocks - i - 1)`` after
its classifier); the finer scales, which the heads never read, keep their gradients. For a
single-Tensor state, rescale(h, s) applies to h. Then the gradient
reaching stage k's output is G_k = (g_k + (K-k-1) J_{k+1}^T G_{k+1}) / (K-k), where g_k comes
from head k: by induction G_k is the *mean* (not the sum) of the K-k back-propagated
gradients of heads k..K-1, so every stage sees gradients of one scale however many exits
follow it. Forward values are unchanged, and so is ``state_dict`` (the rescaling lives in
forward hooks on the stages, removed by :func:`disable_gradient_equilibrium`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GradientRescale", "gradient_rescale", "rescale_coarsest", "enable_gradient_equilibrium",
           "disable_gradient_equilibrium"]

_HANDLES = "_gradient_equilibrium_handles"


class GradientRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (differentiable again)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def gradient_rescale(h, scale: float):
    """Apply :class:`GradientRescale` to a hidden state (a Tensor or a tuple/list of them)."""
    if scale == 1.0 or not torch.is_grad_enabled():
        return h
    if isinstance(h, Tensor):
        return GradientRescale.apply(h, scale) if h.requires_grad else h
    if isinstance(h, (tuple, list)):
        return type(h)(gradient_rescale(t, scale) for t in h)
    raise TypeError(f"hidden state: expected a Tensor or a tuple/list of Tensors, got {type(h).__name__}")


def rescale_coarsest(h, scale: float):
    """GE's rescaling of a hidden state: a Tensor is rescaled; a tuple/list of maps (finest
    first) gets only its last, coarsest, element rescaled (IMTA's ``x[-1]``)."""
    if isinstance(h, (tuple, list)):
        if not h:
            return h
        return type(h)([*h[:-1], gradient_rescale(h[-1], scale)])
    return gradient_rescale(h, scale)


def enable_gradient_equilibrium(model: nn.Module) -> nn.Module:
    """Install GE's rescaling on ``model`` (a ``MultiExitNetwork``: ``stages``, ``num_exits``)
    as forward hooks; idempotent. Returns the model."""
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.ModuleList):
        raise TypeError(f"model: gradient equilibrium needs a MultiExitNetwork (with .stages), "
                        f"got {type(model).__name__}")
    if len({id(s) for s in stages}) != len(stages):
        raise ValueError("model: gradient equilibrium needs distinct stage modules (a stage is shared)")
    if getattr(model, _HANDLES, None):
        return model
    num_exits = len(stages)
    handles = []
    for k, stage in enumerate(stages):
        if k > 0:
            handles.append(stage.register_forward_pre_hook(
                lambda _m, args, s=float(num_exits - k): (rescale_coarsest(args[0], s),) + tuple(args[1:])))
        handles.append(stage.register_forward_hook(
            lambda _m, _args, out, s=1.0 / (num_exits - k): rescale_coarsest(out, s)))
    setattr(model, _HANDLES, handles)
    return model


def disable_gradient_equilibrium(model: nn.Module) -> nn.Module:
    """Remove the hooks of :func:`enable_gradient_equilibrium` (no-op if none)."""
    for handle in getattr(model, _HANDLES, None) or []:
        handle.remove()
    if hasattr(model, _HANDLES):
        delattr(model, _HANDLES)
    return model
