"""Exit heads: small modules mapping a hidden state to logits [N, C]."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvBNReLU", "PooledLinearHead", "ClassTokenHead", "init_conv_bn_linear"]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU: [N, in, H, W] -> [N, out, H', W']."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PooledLinearHead(nn.Module):
    """[optional ConvBNReLU] -> global average pool -> Linear.

    Input [N, in_channels, H, W] float; output logits [N, num_classes].
    With ``conv_channels`` set, a 3x3 ConvBNReLU with ``conv_stride`` runs first.
    """

    def __init__(self, in_channels: int, num_classes: int, conv_channels: int | None = None,
                 conv_stride: int = 1) -> None:
        super().__init__()
        if conv_channels is None:
            self.conv = None
            features = in_channels
        else:
            self.conv = ConvBNReLU(in_channels, conv_channels, 3, stride=conv_stride)
            features = conv_channels
        self.linear = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = self.conv(x)
        return self.linear(x.mean(dim=(2, 3)))


class ClassTokenHead(nn.Module):
    """LayerNorm -> Linear on the class token: [N, T, dim] -> logits [N, num_classes] (token 0)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.linear(self.norm(tokens[:, 0]))


def init_conv_bn_linear(module: nn.Module) -> None:
    """ResNet-style init for every submodule: Kaiming-normal (fan_out, ReLU) convs, BN = identity,
    Linear weights N(0, 0.01) with zero bias."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.BatchNorm2d):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=0.01)
            nn.init.zeros_(sub.bias)
