"""AdaLoss (Hu, Dey, Hebert, Bagnell, AAAI 2019): exit weights inversely proportional to
each exit loss's running average, i.e. SGD on sum_k B_k log E[l_k].

Per step (``shared/DESIGN.md``; no host synchronisation anywhere):
  1. while any running average is unset (NaN, the initial state): w = B (the base weights);
  2. otherwise r_k = B_k / (ema_k + eps), scaled to the target norm (``normalize="sum"``:
     sum r = sum B; ``"max"``: max r = max B);
  3. r_K += final_extra, r <- (1 - gamma) r + gamma, and the target norm again (both
     options are the original code's and are no-ops at their defaults 0);
  4. weights are recomputed only every ``update_every`` steps (held in between);
  5. the fused op then updates ema in place: ema <- L on first sight of a finite L_k,
     else m ema + (1-m) L_k; a non-finite L_k leaves ema_k alone and is counted in
     ``nonfinite_count``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ann_kernels.losses.schemes import Weighting, _base_vector, register_weighting
from ann_kernels.ops.multi_exit_ce import ExitLoss

__all__ = ["AdaLoss", "NORMALIZE"]

NORMALIZE = ("sum", "max")


class AdaLoss(Weighting):
    """Adaptive exit weights. Buffers (all round-trip through ``state_dict``):
    ``ema`` [K] float32 (NaN = unset), ``base`` [K], ``current`` [K] (the weights of the
    latest step), ``steps`` [] int64, ``nonfinite_count`` [K] int64."""

    def __init__(self, num_exits: int, momentum: float = 0.99, eps: float = 1e-8, update_every: int = 1,
                 normalize: str = "sum", gamma: float = 0.0, final_extra: float = 0.0, base=None):
        super().__init__(num_exits)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1), got {momentum!r}")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every: expected a positive integer, got {update_every!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize: expected one of {NORMALIZE}, got {normalize!r}")
        if not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma: expected a value in [0, 1], got {gamma!r}")
        if not isinstance(final_extra, (int, float)) or not final_extra >= 0:
            raise ValueError(f"final_extra: expected a number >= 0, got {final_extra!r}")
        self.momentum, self.eps, self.update_every = float(momentum), float(eps), update_every
        self.normalize, self.gamma, self.final_extra = normalize, float(gamma), float(final_extra)
        base_w = _base_vector(base, self.num_exits)
        self.register_buffer("base", base_w)
        self.register_buffer("ema", torch.full((self.num_exits,), float("nan")))
        self.register_buffer("current", base_w.clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("nonfinite_count", torch.zeros(self.num_exits, dtype=torch.int64))

    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        if self.normalize == "sum":
            return w * (self.base.sum() / w.sum())
        return w * (self.base.max() / w.max())

    def weights_from_state(self, ema: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 1-3 for a given running-average vector (default: the module's own)."""
        ema = self.ema if ema is None else ema
        w = self._norm(self.base / (ema + self.eps))  # 2.
        if self.final_extra or self.gamma:  # 3.
            w = w.clone()
            w[-1] += self.final_extra
            w = self._norm((1.0 - self.gamma) * w + self.gamma)
        return torch.where(torch.isnan(ema).any(), self.base, w)  # 1.

    def weights_for_step(self) -> torch.Tensor:
        if self.update_every == 1:
            w = self.weights_from_state()
        else:  # 4.
            w = torch.where(self.steps % self.update_every == 0, self.weights_from_state(), self.current)
        self.current.copy_(w)
        return self.current.clone()

    def ema_state(self) -> torch.Tensor:
        return self.ema

    def after_step(self, out: ExitLoss) -> None:
        self.steps += 1
        self.nonfinite_count += (~torch.isfinite(out.per_exit)).to(torch.int64)

    def synchronize_(self) -> None:
        """Average ``ema`` over the ranks of the default process group (entries unset on
        every rank stay unset; ranks where an entry is unset do not count for it). No-op
        outside ``torch.distributed``."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        is_set = ~torch.isnan(self.ema)
        packed = torch.stack([torch.where(is_set, self.ema, torch.zeros_like(self.ema)), is_set.float()])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        total, count = packed[0], packed[1]
        self.ema.copy_(torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("nan"))))

    def extra_repr(self) -> str:
        return (f"num_exits={self.num_exits}, momentum={self.momentum}, eps={self.eps}, "
                f"update_every={self.update_every}, normalize={self.normalize!r}, gamma={self.gamma}, "
                f"final_extra={self.final_extra}")


register_weighting("adaloss", AdaLoss)
