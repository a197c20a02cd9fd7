"""A cheap MLP anytime network (the inference benchmark's MLP ANN)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ann_kernels.nn._checks import check_positive_ints
from ann_kernels.nn.multi_exit import MultiExitNetwork

__all__ = ["mlp_ann", "LinearReLU"]


class LinearReLU(nn.Linear):
    """relu(x W^T + b): [N, in_features] -> [N, out_features] in one module call.

    With ``flatten_input``, inputs [N, *dims] with prod(dims) == in_features (e.g. images
    [N, C, H, W]) are flattened first.
    """

    def __init__(self, in_features: int, out_features: int, flatten_input: bool = False) -> None:
        super().__init__(in_features, out_features)
        self.flatten_input = flatten_input

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten_input and x.dim() > 2:
            x = x.flatten(1)
        return F.relu(F.linear(x, self.weight, self.bias), inplace=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", flatten_input=True" if self.flatten_input else "")


def mlp_ann(in_features: int = 256, hidden: int = 256, num_exits: int = 6,
            num_classes: int = 10) -> MultiExitNetwork:
    """``num_exits`` stages of Linear + ReLU with a Linear head after each.

    Stage 0 maps ``in_features`` -> ``hidden``, later stages ``hidden`` -> ``hidden``; head k
    is ``Linear(hidden, num_classes)``.

    Input:  x float [N, in_features], or [N, *dims] with prod(dims) == in_features (flattened).
    Output: ``forward`` returns ``num_exits`` logits, each float [N, num_classes].
    Hidden states are float [N, hidden].
    """
    check_positive_ints(in_features=in_features, hidden=hidden, num_exits=num_exits, num_classes=num_classes)
    stages = [LinearReLU(in_features, hidden, flatten_input=True)]
    stages += [LinearReLU(hidden, hidden) for _ in range(num_exits - 1)]
    heads = [nn.Linear(hidden, num_classes) for _ in range(num_exits)]
    return MultiExitNetwork(stages, heads, num_classes=num_classes)
