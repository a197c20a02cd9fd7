"""Common multi-exit training recipes as weighting schemes (registered names in brackets).

- SDN schedule [``sdn``] (Kaya et al., "Shallow-Deep Networks", ICML 2019): the weight of
  every internal exit rises linearly with the epoch from ``start`` to its cap, the final
  exit's weight is 1. At epoch e of E (0-based): w_k = min(cap_k, start + cap_k e / E) for
  k < K. Default caps: the exit's relative depth (k+1)/K (SDN's 0.15 ... 0.9 for ICs at
  15% ... 90% of the network).
- IMTA one-for-all knowledge distillation [``imta_kd``] (Li et al., "Improved Techniques for
  Training Adaptive Deep Networks", ICCV 2019; kalviny/IMTA ``utils.py`` ``KDLoss.loss_fn_kd``):
  for every exit k < K,
      loss_k = (1 - alpha) CE(z_k, y) + alpha T^2 KLDivLoss(log_softmax(z_k / T), softmax(z_K / T).detach())
  the last exit keeps plain CE; the total is sum_k B_k loss_k (B: base weights, CONST by
  default). ``nn.KLDivLoss()``'s default ``reduction="mean"`` averages over all N x C
  elements, i.e. 1/C of the per-sample KL divergence (``reduction="batchmean"``: per sample,
  our earlier behaviour). Defaults T = 1, alpha (IMTA's ``--gamma``) = 0.1 are
  ``run_IMTA.sh``'s (``-T 1.0 --gamma 0.1``; ``args.py``'s parser defaults are 3 and 0.9).
  Deviation: IMTA fine-tunes the classifiers of a GE-pretrained, frozen MSDNet and takes the
  teacher from that backbone's final exit; here the whole network trains jointly and the
  teacher is the current final exit (detached). The CE parts go through the fused op (one
  pass); the KL term needs the soft predictions at temperature T, which the fused op does
  not produce, so it is a second, pure-torch pass (rows equal to ``ignore_index`` are
  excluded; the mean runs over the others).
- Gradient equilibrium [``ge``] (the same paper): CONST (or ``base``) exit weights, with the
  Trainer installing :func:`ann_kernels.nn.enable_gradient_equilibrium` on the model. Any
  other scheme can use GE too with ``TrainConfig(gradient_equilibrium=True)`` /
  ``ann-kernels train --gradient-equilibrium``. The loss itself is CONST's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ann_kernels.losses.schemes import StaticWeighting, Weighting, _base_vector, register_weighting
from ann_kernels.ops.multi_exit_ce import multi_exit_cross_entropy

__all__ = ["SDNSchedule", "IMTADistillation", "GradientEquilibrium", "sdn_weights", "KD_REDUCTIONS"]


def sdn_weights(caps: torch.Tensor, epoch: int, total_epochs: int, start: float = 0.01) -> torch.Tensor:
    """SDN's weights [K] at 0-based ``epoch`` of ``total_epochs``: internal exits
    min(cap_k, start + cap_k * epoch / total_epochs), the last exit 1."""
    w = torch.minimum(caps, start + caps * (epoch / total_epochs))
    w[-1] = 1.0
    return w


class SDNSchedule(Weighting):
    """SDN's linearly rising internal-exit weights (see the module docstring). ``caps``: K-1
    (or K, last ignored) maximum weights of the internal exits; ``start``: their weight
    at epoch 0. The Trainer calls :meth:`set_epoch` at the start of every epoch."""

    def __init__(self, num_exits: int, caps=None, start: float = 0.01):
        super().__init__(num_exits)
        k = self.num_exits
        if caps is None:
            c = torch.arange(1, k + 1, dtype=torch.float32) / k
        else:
            c = torch.as_tensor(caps, dtype=torch.float32).flatten()
            if c.numel() == k - 1:
                c = torch.cat([c, torch.ones(1)])
            if c.numel() != k or not torch.isfinite(c).all() or (c < 0).any():
                raise ValueError(f"caps: expected {k - 1} non-negative internal-exit caps, got {caps!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start <= 1:
            raise ValueError(f"start: expected a weight in [0, 1], got {start!r}")
        self.start = float(start)
        self.register_buffer("caps", c)
        self.register_buffer("current", sdn_weights(c, 0, 1, self.start))

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        if total_epochs < 1 or not 0 <= epoch:
            raise ValueError(f"epoch: expected 0 <= epoch with total_epochs >= 1, "
                             f"got {epoch} of {total_epochs}")
        self.current.copy_(sdn_weights(self.caps, epoch, total_epochs, self.start))

    def weights_for_step(self) -> torch.Tensor:
        return self.current

    def extra_repr(self) -> str:
        return f"caps={[round(v, 3) for v in self.caps.tolist()]}, start={self.start}"


KD_REDUCTIONS = ("mean", "batchmean")


class IMTADistillation(Weighting):
    """IMTA's one-for-all knowledge distillation (see the module docstring). Options:
    ``temperature`` T > 0 (default 1), ``alpha`` in [0, 1] (default 0.1), ``reduction``
    ``"mean"`` (``nn.KLDivLoss``'s default, as IMTA; over N x C) or ``"batchmean"`` (over N),
    ``base`` weights. Our earlier defaults: ``temperature=3, alpha=0.5, reduction="batchmean"``."""

    def __init__(self, num_exits: int, temperature: float = 1.0, alpha: float = 0.1, reduction: str = "mean",
                 base=None):
        super().__init__(num_exits)
        if reduction not in KD_REDUCTIONS:
            raise ValueError(f"reduction: expected one of {KD_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.register_buffer("base", _base_vector(base, self.num_exits))
        ce = self.base.clone()
        ce[:-1] *= 1.0 - self.alpha
        self.register_buffer("ce_weights", ce)

    def weights_for_step(self) -> torch.Tensor:
        return self.ce_weights

    def distillation(self, heads: list[torch.Tensor], target: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
        """sum_{k<K} B_k alpha T^2 KL(p_K^T || p_k^T), mean over the non-ignored rows (and, for
        ``reduction="mean"``, over the C classes too); float32 []."""
        t = self.temperature
        valid = target != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        if self.reduction == "mean":
            n_valid = n_valid * heads[-1].shape[-1]
        teacher = F.softmax(heads[-1].detach().float() / t, dim=-1)
        log_teacher = F.log_softmax(heads[-1].detach().float() / t, dim=-1)
        total = heads[0].new_zeros((), dtype=torch.float32)
        for k, z in enumerate(heads[:-1]):
            kl = (teacher * (log_teacher - F.log_softmax(z.float() / t, dim=-1))).sum(dim=-1)  # [N]
            total = total + self.base[k].to(z.device) * (kl * valid).sum() / n_valid
        return self.alpha * t * t * total

    def compute(self, heads, target, *, ignore_index, label_smoothing, sample_weights=None):
        # sample_weights weight the cross-entropy terms; the distillation term stays unweighted.
        weights = self.ce_weights.to(heads[0].device)
        out = multi_exit_cross_entropy(heads, target, weights, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, sample_weights=sample_weights)
        if self.alpha > 0 and len(heads) > 1:
            out = out._replace(loss=out.loss + self.distillation(list(heads), target, ignore_index))
        return out, weights

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}"


class GradientEquilibrium(StaticWeighting):
    """CONST (or ``base``) exit weights trained with IMTA's gradient equilibrium: the
    Trainer sees ``gradient_equilibrium = True`` and installs the rescaling on the model."""

    gradient_equilibrium = True

    def __init__(self, num_exits: int, base=None):
        super().__init__(num_exits, _base_vector(base, num_exits), name="ge")


register_weighting("sdn", SDNSchedule)
register_weighting("imta_kd", IMTADistillation)
register_weighting("ge", GradientEquilibrium)
