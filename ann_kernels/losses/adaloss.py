"""AdaLoss (Hu, Dey, Hebert, Bagnell, AAAI 2019): exit weights inversely proportional to
each exit loss's running average, i.e. SGD on sum_k B_k log E[l_k].

Defaults are the original code's (EchoWho/AnytimeNeuralNetwork_public, newest snapshot):
``anytime_models/models/online_learn.py``, ``AdaptiveLossWeight._after_run``, with the
parser defaults of ``anytime_models/models/anytime_network.py``,
``parser_add_common_arguments`` (``--adaloss_momentum 0.9``, ``--adaloss_update_per 100``,
``--adaloss_gamma 0.07``, ``--adaloss_final_extra 0.0``) and the initial weight variable of
``AnytimeNetwork._get_select_idx`` (all ones). Per step t = 1, 2, ... (no host sync):

  1. step t trains with the current weights: all ones (B) until the first update;
  2. then the fused op updates the running averages in place: ema <- L_1 at the first step,
     else ema <- m ema + (1 - m) L_t (m = ``momentum`` = 0.9);
  3. after every ``update_every`` (= 100) steps, i.e. before steps 101, 201, ..., the weights
     are recomputed from ema (which includes step t's losses)::

        w = B / ema + eps            (original: 1 / avg_losses + 1e-8; B = 1 by default)
        w = w / max(w) * max(B)      (original: w /= max(w))
        w[K] += final_extra          (default 0.0)
        w = w / max(w) * max(B)
        w = (1 - gamma) w + gamma    (gamma = 0.07), NOT renormalised afterwards

     and held until the next update.

Options keep the earlier behaviour available: ``normalize="sum"`` computes
w = B / (ema + eps) scaled so sum w = sum B, then (only if ``final_extra`` or ``gamma``)
w_K += final_extra, w <- (1 - gamma) w + gamma and the sum scaling again; our earlier
defaults were ``AdaLoss(K, momentum=0.99, update_every=1, normalize="sum", gamma=0.0)``.

Deviations from the original, all for robustness: a non-finite L_k never enters ema (it is
counted in ``nonfinite_count``; the original would store the NaN); in ``normalize="max"``
ema is clamped to >= 1e-30 before the division (the original divides by zero when a loss is
exactly 0, e.g. a batch of ignored rows); ``base`` weights B are an extension (the original
has none: B = 1). The weights never carry gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ann_kernels.losses.schemes import Weighting, _base_vector, register_weighting, sieve_weights
from ann_kernels.ops.multi_exit_ce import ExitLoss

__all__ = ["AdaLoss", "NORMALIZE"]

NORMALIZE = ("sum", "max")


class AdaLoss(Weighting):
    """Adaptive exit weights (module docstring; defaults = the original code's). Buffers (all round-trip through ``state_dict``):
    ``ema`` [K] float32 (NaN = unset), ``base`` [K], ``current`` [K] (the weights of the
    latest step), ``steps`` [] int64, ``nonfinite_count`` [K] int64."""

    def __init__(self, num_exits: int, momentum: float = 0.9, eps: float = 1e-8, update_every: int = 100,
                 normalize: str = "max", gamma: float = 0.07, final_extra: float = 0.0, base=None):
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
        """The weights step 3 computes from a running-average vector (default: the module's
        own); B while any entry is unset."""
        ema = self.ema if ema is None else ema
        if self.normalize == "max":  # the original's order (module docstring, step 3)
            w = self._norm(self.base / ema.clamp_min(1e-30) + self.eps)
            if self.final_extra:
                w = w.clone()
                w[-1] += self.final_extra
            w = (1.0 - self.gamma) * self._norm(w) + self.gamma
        else:
            w = self._norm(self.base / (ema + self.eps))
            if self.final_extra or self.gamma:
                w = w.clone()
                w[-1] += self.final_extra
                w = self._norm((1.0 - self.gamma) * w + self.gamma)
        return torch.where(torch.isnan(ema).any(), self.base, w)

    def weights_for_step(self) -> torch.Tensor:
        # ``steps`` counts finished steps: the weights change before steps 0, E, 2E, ...
        # (0-based; E = update_every), i.e. after the original's cnt % update_per == 0.
        # At step 0 ema is unset, so that step trains with B.
        if self.update_every == 1:
            w = self.weights_from_state()
        else:
            w = torch.where(self.steps % self.update_every == 0, self.weights_from_state(), self.current)
        self.current.copy_(w)
        return self.current.clone()

    def decay_weights(self) -> torch.Tensor:
        """The original's static weights for AdaLoss runs (``AnytimeNetwork.__init__`` sets
        ``func_type = FUNC_TYPE_ANN`` for ``samloss = 100``): SIEVE with w_K = 1; they scale
        the FC weight decay (``TrainConfig(weight_decay_mode="reference")``)."""
        return sieve_weights(self.num_exits)

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
