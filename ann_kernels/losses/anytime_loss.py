"""``AnytimeLoss``: a drop-in for ``nn.CrossEntropyLoss`` over a list of exit logits.

Naming chain: fused op ``torch.ops.ann_kernels.multi_exit_ce`` -> functional
``ann_kernels.multi_exit_cross_entropy`` -> this module, which adds the weighting scheme
(``self.weighting``, any :class:`~ann_kernels.losses.schemes.Weighting`) and keeps what a
training loop wants to log.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ann_kernels.losses.schemes import Weighting, make_weighting
from ann_kernels.ops.multi_exit_ce import ExitLoss

__all__ = ["AnytimeLoss"]


class AnytimeLoss(nn.Module):
    """``loss = AnytimeLoss(K, weighting="adaloss")(exit_logits, target)``.

    ``exit_logits``: K tensors [N, C] (or one stacked [K, N, C]) in fp32/bf16/fp16;
    ``target``: [N] int64. Returns the scalar sum_k w_k L_k (float32, differentiable).
    ``weighting``: a scheme name (``adaloss``, ``const``, ``linear``, ``half_end``,
    ``opt``, ``sieve``, ``eann_sieve``, ``oscillating``, ...), a ``Weighting`` object or K
    explicit weights; ``weighting_kwargs`` go to the scheme (e.g. ``momentum=0.9``).

    After each call: ``weights`` [K] (the weights that call used), ``last_per_exit`` [K]
    (its L_k) and ``last`` (the full :class:`~ann_kernels.ExitLoss`: per-sample losses,
    confidences, predictions). All state is in buffers: ``state_dict`` round-trips exactly.
    """

    def __init__(self, num_exits: int, weighting: str | Weighting | Sequence[float] | torch.Tensor = "adaloss", *,
                 ignore_index: int = -100, label_smoothing: float = 0.0, **weighting_kwargs):
        super().__init__()
        self.weighting = make_weighting(weighting, num_exits, **weighting_kwargs)
        self.num_exits = self.weighting.num_exits
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing!r}")
        self.ignore_index, self.label_smoothing = ignore_index, float(label_smoothing)
        self.register_buffer("last_weights", self._initial_weights())
        self.register_buffer("last_per_exit", torch.full((self.num_exits,), float("nan")))
        self.last: ExitLoss | None = None

    def _initial_weights(self) -> torch.Tensor:
        w = getattr(self.weighting, "base", None)
        return w.detach().clone().float() if isinstance(w, torch.Tensor) else torch.ones(self.num_exits)

    @property
    def weights(self) -> torch.Tensor:
        """float32 [K]: the weights of the latest call (before any call: the initial ones)."""
        return self.last_weights

    def forward(self, logits: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor,
                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss (float32). ``sample_weights``: optional per-sample weights, float32 [N]
        (shared by the exits) or [K, N]; loss = sum_k w_k sum_i s_ik l_ik / N_valid, in the
        fused pass, differentiable w.r.t. them (``last_per_exit`` stays the unweighted L_k)."""
        heads = list(logits.unbind(0)) if isinstance(logits, torch.Tensor) and logits.dim() == 3 else logits
        if isinstance(heads, torch.Tensor) or not isinstance(heads, Sequence):
            raise TypeError(f"logits: expected {self.num_exits} exit tensors [N, C] or one [K, N, C] tensor, "
                            f"got {type(logits).__name__}"
                            + (f" of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else ""))
        heads = list(heads)
        if len(heads) != self.num_exits:
            raise ValueError(f"logits: expected {self.num_exits} exits (num_exits), got {len(heads)}")
        extra = {} if sample_weights is None else {"sample_weights": sample_weights}
        out, weights = self.weighting.compute(heads, target, ignore_index=self.ignore_index,
                                              label_smoothing=self.label_smoothing, **extra)
        self.weighting.after_step(out)
        with torch.no_grad():
            self.last_weights.copy_(weights)
            self.last_per_exit.copy_(out.per_exit)
        self.last = out
        return out.loss

    def pre_step(self, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, **kwargs):
        """The scheme's work before a training step's forward (L2W's meta step: it needs the
        model, the optimiser and the batch x [N, ...], y [N]; ``kwargs`` go to the scheme,
        e.g. L2W's ``meta=`` half batch); a no-op for other schemes."""
        return self.weighting.pre_step(model, optimizer, x, y, ignore_index=self.ignore_index,
                                       label_smoothing=self.label_smoothing, **kwargs)

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
