"""``AnytimeLinearLoss``: a drop-in for "stack the exits, apply lm_head, cross-entropy"
for early-exit language models whose exits share one LM head.

Naming chain: fused op ``torch.ops.ann_kernels.multi_exit_linear_ce`` -> functional
``ann_kernels.multi_exit_linear_cross_entropy`` -> this module, which adds the weighting
scheme (every scheme :class:`~ann_kernels.AnytimeLoss` takes, plus ``layerskip``: see
:mod:`ann_kernels.losses.layerskip`) and keeps what a training loop logs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ann_kernels.losses import layerskip as _layerskip  # noqa: F401  (registers "layerskip")
from ann_kernels.losses.schemes import Weighting, make_weighting
from ann_kernels.ops.multi_exit_ce import ExitLoss
from ann_kernels.ops.multi_exit_linear_ce import multi_exit_linear_cross_entropy

__all__ = ["AnytimeLinearLoss"]


class AnytimeLinearLoss(nn.Module):
    """``loss = AnytimeLinearLoss(model.lm_head, K, weighting="layerskip", ...)(hidden, target)``.

    Args:
        lm_head: an ``nn.Linear(H, V)`` shared by every exit (weight [V, H], optional bias
            [V]), or a sequence of K such heads (one per exit; stacked to [K, V, H] per call).
        num_exits: K.
        weighting: a scheme name (``adaloss``, ``const``, ``linear``, ``half_end``, ``opt``,
            ``sieve``, ``eann_sieve``, ``oscillating``, ``layerskip``, ...), a ``Weighting``
            object or K explicit weights; ``weighting_kwargs`` go to the scheme (e.g.
            ``scale="sum", curriculum="rot"`` for ``layerskip``).
        z_loss, label_smoothing, ignore_index: as :func:`~ann_kernels.multi_exit_linear_cross_entropy`.

    ``forward(hidden, target, sample_weights=None)``: hidden is K tensors [..., H] (or one
    [K, ..., H]) with the final norm already applied, target [...] int64 (same leading
    shape, flattened). Returns the scalar loss. Schemes whose step needs the logits
    themselves (L2W, distillation) get them materialised (with a one-time warning).
    After each call: ``weights`` [K], ``last_per_exit`` [K], ``last`` (the ExitLoss).
    """

    def __init__(self, lm_head: nn.Linear | Sequence[nn.Linear], num_exits: int,
                 weighting: str | Weighting | Sequence[float] | torch.Tensor = "const", *,
                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 memory_budget_mb: float | None = None, **weighting_kwargs):
        super().__init__()
        heads = list(lm_head) if isinstance(lm_head, (list, tuple, nn.ModuleList)) else [lm_head]
        for h in heads:
            if not isinstance(h, nn.Linear):
                raise TypeError(f"lm_head: expected an nn.Linear (or K of them), got {type(h).__name__}")
        if len(heads) not in (1, num_exits):
            raise ValueError(f"lm_head: expected one shared head or {num_exits} heads (num_exits), got {len(heads)}")
        # Kept outside the module tree: the model owns (and saves) its heads.
        self._heads = heads
        self.weighting = make_weighting(weighting, num_exits, **weighting_kwargs)
        self.num_exits = self.weighting.num_exits
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing!r}")
        if not z_loss >= 0.0:
            raise ValueError(f"z_loss: expected a value >= 0, got {z_loss!r}")
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, float(label_smoothing), float(z_loss)
        self.memory_budget_mb = memory_budget_mb
        self.register_buffer("last_weights", torch.ones(self.num_exits))
        self.register_buffer("last_per_exit", torch.full((self.num_exits,), float("nan")))
        self.last: ExitLoss | None = None
        self._fused = type(self.weighting).compute is Weighting.compute

    @property
    def weights(self) -> torch.Tensor:
        return self.last_weights

    @property
    def heads(self) -> list[nn.Linear]:
        """The head modules the loss reads (one shared head, or K), owned by the model."""
        return list(self._heads)

    def _head_params(self):
        for h in self._heads:
            if type(h.weight).__name__ == "DTensor":  # FSDP2 keeps sharded DTensors outside forward
                raise RuntimeError(
                    "lm_head: its weight is a sharded DTensor (FSDP2 fully_shard) outside the head's forward; "
                    "compute the loss inside ann_kernels.losses.lm_objective.EarlyExitLMObjective (which "
                    "gathers the head), or call head.unshard() on the fully_shard-ed head before the loss")
        if len(self._heads) == 1:
            return self._heads[0].weight, self._heads[0].bias
        weight = torch.stack([h.weight for h in self._heads])
        biases = [h.bias for h in self._heads]
        bias = torch.stack(biases) if all(b is not None for b in biases) else None
        return weight, bias

    def forward(self, hidden, target: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        exits = list(hidden.unbind(0)) if isinstance(hidden, torch.Tensor) else list(hidden)
        if len(exits) != self.num_exits:
            raise ValueError(f"hidden: expected {self.num_exits} exits (num_exits), got {len(exits)}")
        width = exits[0].shape[-1]
        exits = [h.reshape(-1, width) for h in exits]
        target = target.reshape(-1)
        weight, bias = self._head_params()
        if self._fused:
            weights = self.weighting.weights_for_step()
            out = multi_exit_linear_cross_entropy(
                exits, weight, target, weights, bias=bias, ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing, sample_weights=sample_weights, ema=self.weighting.ema_state(),
                momentum=self.weighting.momentum, z_loss=self.z_loss, memory_budget_mb=self.memory_budget_mb)
        else:
            if sample_weights is not None or self.z_loss:
                raise ValueError(f"sample_weights / z_loss: not supported with the {type(self.weighting).__name__} "
                                 "scheme, which weights the materialised logits itself")
            warnings.warn(f"AnytimeLinearLoss: the {type(self.weighting).__name__} scheme needs the logits; "
                          "materialising K x N x V of them", RuntimeWarning, stacklevel=2)
            logits = [nn.functional.linear(h, weight[k] if weight.dim() == 3 else weight,
                                           None if bias is None else (bias[k] if bias.dim() == 2 else bias))
                      for k, h in enumerate(exits)]
            out, weights = self.weighting.compute(logits, target, ignore_index=self.ignore_index,
                                                  label_smoothing=self.label_smoothing)
        self.weighting.after_step(out)
        with torch.no_grad():
            self.last_weights.copy_(weights.detach())
            self.last_per_exit.copy_(out.per_exit)
        self.last = out
        return out.loss

    def extra_repr(self) -> str:
        return (f"num_exits={self.num_exits}, shared_head={len(self._heads) == 1}, z_loss={self.z_loss}, "
                f"label_smoothing={self.label_smoothing}")
