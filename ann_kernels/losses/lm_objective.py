"""``EarlyExitLMObjective``: an early-exit LM and its :class:`AnytimeLinearLoss` as one
module whose ``forward(tokens, target)`` returns the loss, so data-parallel wrappers see
the whole step.

Why a module: ``AnytimeLinearLoss`` reads ``lm_head.weight`` itself (the fused linear +
cross-entropy never calls the head's forward). Under DDP that is harmless, but DDP only
prepares its gradient reduction when its wrapped module's ``forward`` runs, and the model's
``forward_hidden`` is not ``forward``. Under FSDP2 (``torch.distributed.fsdp.fully_shard``)
a parameter is a sharded ``DTensor`` except while its FSDP group is unsharded, which FSDP
does around the group's ``forward``. This module is the place FSDP2 and DDP expect:

- ``DistributedDataParallel(EarlyExitLMObjective(model, loss))``: gradients all-reduced
  (averaged) over ranks, so with equal per-rank token counts the step equals one process
  on the global batch.
- ``fully_shard(...)`` of any sub-modules, then ``fully_shard(objective)`` as the root:
  the root's forward unshards the root group (the head too, when it is not sharded on its
  own, and the root stays unsharded until backward); a head that is its own group (or in a
  group with the embedding it is tied to) is gathered here with ``head.unshard()``, and
  FSDP2's end-of-backward callback reduce-scatters its gradient and reshards it (FSDP2
  runs ``post_backward`` for every group still unsharded when backward ends).

Steps of :meth:`EarlyExitLMObjective.forward`: 1. the K exits' normed hidden states
(``model.forward_hidden``); 2. gather every FSDP2-sharded head; 3. the fused loss.
"""

from __future__ import annotations

import torch
from torch import nn

from ann_kernels.losses.linear_loss import AnytimeLinearLoss

__all__ = ["EarlyExitLMObjective", "gather_sharded_heads"]


def _is_sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def gather_sharded_heads(heads) -> list[nn.Module]:
    """``unshard()`` every head in ``heads`` whose weight is an FSDP2-sharded DTensor;
    returns the heads gathered (each once). A sharded head that is not itself a
    ``fully_shard``-ed module (so it cannot be gathered here) raises a clear error."""
    gathered = []
    for h in dict.fromkeys(heads):  # a shared head appears once
        if not _is_sharded(h.weight):
            continue
        if not callable(getattr(h, "unshard", None)):
            raise RuntimeError(
                f"lm_head: the weight of {type(h).__name__} is sharded by an FSDP2 group that does not have the "
                "head as a module; fully_shard the head itself (or [embedding, head] when tied), or leave it in "
                "the root group")
        h.unshard()
        gathered.append(h)
    return gathered


class EarlyExitLMObjective(nn.Module):
    """``loss = EarlyExitLMObjective(model, loss_fn)(tokens, target)``.

    Args:
        model: an early-exit LM with ``forward_hidden(tokens) -> K hidden states [B, S, D]``
            (after the final norm), e.g. :func:`ann_kernels.nn.causal_lm.causal_exit_lm`.
        loss_fn: the :class:`AnytimeLinearLoss` over the model's head(s).
        autocast_dtype: run the model (not the loss) under CPU autocast to this dtype (e.g.
            ``torch.bfloat16``); the hidden states go to the loss in float32.

    ``forward(tokens [B, S] int64, target [B, S] int64, sample_weights=None)`` -> scalar
    float32 loss. The loss module is kept outside the module tree (its state, e.g. AdaLoss's
    running averages, is per rank until ``loss_fn.weighting.synchronize_()``, and DDP must
    not broadcast it); the model is the only child.
    """

    def __init__(self, model: nn.Module, loss_fn: AnytimeLinearLoss, *, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if not callable(getattr(model, "forward_hidden", None)):
            raise TypeError(f"model: expected an early-exit LM with forward_hidden(tokens), got {type(model).__name__}")
        if not isinstance(loss_fn, AnytimeLinearLoss):
            raise TypeError(f"loss_fn: expected an AnytimeLinearLoss, got {type(loss_fn).__name__}")
        self.model = model
        self.__dict__["loss_fn"] = loss_fn
        self.autocast_dtype = autocast_dtype

    def forward(self, tokens: torch.Tensor, target: torch.Tensor,
                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            hidden = self.model.forward_hidden(tokens)  # 1. K normed hidden states
        if self.autocast_dtype is not None:
            hidden = [h.float() for h in hidden]
        gathered = gather_sharded_heads(self.loss_fn.heads)  # 2. FSDP2: full head weights
        loss = self.loss_fn(hidden, target, sample_weights)  # 3. fused linear + multi-exit CE
        if gathered and not torch.is_grad_enabled():  # no backward will reshard them
            for h in gathered:
                h.reshard()
        return loss
