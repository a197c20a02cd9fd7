"""Optimiser parameter groups for weight decay (``TrainConfig.weight_decay_mode``).

- ``"all"``: every parameter gets ``weight_decay`` (BN / LayerNorm scales and biases too);
  our earlier behaviour and the default.
- ``"reference"``: the original AdaLoss code's regulariser (EchoWho/AnytimeNeuralNetwork_public,
  ``anytime_models/models/anytime_network.py``, ``AnytimeNetwork._build_graph``)::

      wd_cost = sum_k cost_weight_k * wd * (l2_loss(W_k) + l2_loss(b_k))   # exit k's FC
              + wd * sum l2_loss(every '.*conv.*/W')                        # all conv kernels

  (``l2_loss(x) = sum x^2 / 2``, so its gradient is ``wd * x``: exactly SGD's
  ``weight_decay``). Here: every convolution weight (stages and heads) gets ``wd``; the
  ``nn.Linear`` weight *and* bias of exit k's head get ``wd * s_k`` with s_k the scheme's
  static weight (:meth:`~ann_kernels.losses.schemes.Weighting.decay_weights`: a static
  scheme's own weights; AdaLoss: SIEVE with w_K = 1, as the original builds AdaLoss runs on
  ``func_type = FUNC_TYPE_ANN``); a head shared by several exits gets the sum of their
  s_k (the original's terms add up). BatchNorm / LayerNorm parameters, convolution biases
  and embeddings get none. ``nn.Linear`` layers outside the heads (a transformer's
  projections; the original has none) are treated like convolutions: weight ``wd``, bias 0.
  The original's default ``--regularize_const`` is 1e-4.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WEIGHT_DECAY_MODES", "weight_decay_groups"]

WEIGHT_DECAY_MODES = ("all", "reference")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_decay_groups(model: nn.Module, weight_decay: float, mode: str = "all",
                        exit_weights: torch.Tensor | None = None) -> list[dict]:
    """Parameter groups ``[{"params": [...], "weight_decay": wd}, ...]`` for ``torch.optim``.

    ``exit_weights``: float [K], the static weight of each exit's head (``"reference"`` mode;
    default ones). Every trainable parameter of ``model`` appears in exactly one group;
    groups with equal decay are merged, empty groups dropped.
    """
    if mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode: expected one of {WEIGHT_DECAY_MODES}, got {mode!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "all":
        return [{"params": params, "weight_decay": float(weight_decay)}]
    decay: dict[int, float] = {}  # id(param) -> decay factor (times weight_decay)
    heads = getattr(model, "heads", None)
    head_param_ids: set[int] = set()
    if isinstance(heads, nn.ModuleList):
        k = len(heads)
        w = torch.ones(k, dtype=torch.float64) if exit_weights is None else \
            torch.as_tensor(exit_weights, dtype=torch.float64).detach().cpu().flatten()
        if w.numel() != k:
            raise ValueError(f"exit_weights: expected {k} static weights (one per head), got {w.numel()}")
        for j, head in enumerate(heads):
            for sub in head.modules():
                if isinstance(sub, nn.Linear):
                    for p in (sub.weight, sub.bias):
                        if p is not None:
                            # a shared head's terms add up; count each exit once per param
                            decay[id(p)] = decay.get(id(p), 0.0) + float(w[j])
                            head_param_ids.add(id(p))
    for sub in model.modules():
        if isinstance(sub, _CONV) or (isinstance(sub, nn.Linear) and id(sub.weight) not in head_param_ids):
            decay.setdefault(id(sub.weight), 1.0)
    by_factor: dict[float, list] = {}
    for p in params:
        by_factor.setdefault(decay.get(id(p), 0.0), []).append(p)
    return [{"params": ps, "weight_decay": float(weight_decay) * f} for f, ps in sorted(by_factor.items())]
