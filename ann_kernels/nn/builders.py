"""All model builders in one namespace; each returns a MultiExitNetwork with num_classes set."""

from ann_kernels.nn.mlp import mlp_ann
from ann_kernels.nn.msdnet import msdnet
from ann_kernels.nn.resann import resann
from ann_kernels.nn.transformer import exit_transformer

__all__ = ["resann", "msdnet", "exit_transformer", "mlp_ann"]
