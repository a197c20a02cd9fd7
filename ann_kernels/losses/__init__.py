"""Loss weighting for anytime networks: static schemes, AdaLoss, and the ``AnytimeLoss``
module (see ``shared/DESIGN.md``, "Weighting schemes")."""

from ann_kernels.losses.schemes import (  # noqa: F401
    WEIGHTINGS, Oscillating, StaticWeighting, Weighting, const_weights, eann_sieve_weights, half_end_weights,
    linear_weights, make_weighting, opt_weights, register_weighting, sieve_weights, static_weights,
)
from ann_kernels.losses.adaloss import AdaLoss  # noqa: F401  (registers "adaloss")
from ann_kernels.losses.anytime_loss import AnytimeLoss  # noqa: F401
from ann_kernels.losses.baselines import GradientEquilibrium, IMTADistillation, SDNSchedule  # noqa: F401
from ann_kernels.losses.l2w import L2W  # noqa: F401  (registers "l2w")
from ann_kernels.losses.layerskip import LayerSkipWeighting, layerskip_loss_scales  # noqa: F401
from ann_kernels.losses.linear_loss import AnytimeLinearLoss  # noqa: F401
from ann_kernels.losses.lm_objective import EarlyExitLMObjective, gather_sharded_heads  # noqa: F401
from ann_kernels.losses.hf_llama import HFLlamaEarlyExitLoss  # noqa: F401  (transformers not imported)

__all__ = [
    "AnytimeLinearLoss", "LayerSkipWeighting", "layerskip_loss_scales",
    "EarlyExitLMObjective", "gather_sharded_heads", "HFLlamaEarlyExitLoss",
    "AdaLoss", "AnytimeLoss", "GradientEquilibrium", "IMTADistillation", "L2W", "SDNSchedule",
    "Oscillating", "StaticWeighting", "WEIGHTINGS", "Weighting", "const_weights",
    "eann_sieve_weights", "half_end_weights", "linear_weights", "make_weighting", "opt_weights",
    "register_weighting", "sieve_weights", "static_weights",
]
