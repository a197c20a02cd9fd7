"""Anytime networks: ``MultiExitNetwork`` (K stages + K exit heads, FLOP accounting) and
model builders (ResANN, MSDNet, an early-exit ViT, a cheap MLP)."""

from ann_kernels.nn.builders import exit_transformer, mlp_ann, msdnet, resann
from ann_kernels.nn.gradient_equilibrium import disable_gradient_equilibrium, enable_gradient_equilibrium
from ann_kernels.nn.multi_exit import HiddenState, MultiExitNetwork

__all__ = ["MultiExitNetwork", "HiddenState", "resann", "msdnet", "exit_transformer", "mlp_ann",
           "enable_gradient_equilibrium", "disable_gradient_equilibrium"]
