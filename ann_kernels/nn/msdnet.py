"""MSDNet (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
Classification", ICLR 2018), scaled down for CPUs.

The hidden state is a tuple of feature maps, finest scale first; scale s has resolution
1/2^s of the input (1/2^(s+1) with ``stem_stride=2``) and ``base_channels * 2^s`` initial
channels. Every MSD layer appends,
at each scale s, ``growth * 2^s`` new channels computed from the same scale (regular conv)
and, for s > 0, from the next finer scale (strided conv), half each — dense connectivity
along depth by concatenation. As in the paper's "max" pruning, later blocks drop the finest
scales (the state tuple gets shorter); exit classifiers read the coarsest scale only.
Transition (compression) layers of the original are omitted: the networks here are shallow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ann_kernels.nn._checks import check_positive_ints
from ann_kernels.nn.heads import ConvBNReLU, PooledLinearHead, init_conv_bn_linear
from ann_kernels.nn.multi_exit import MultiExitNetwork

__all__ = ["msdnet", "MSDFirstLayer", "MSDLayer", "ScaleGrowth", "CoarsestScaleHead", "scales_per_block"]


class BottleneckConv(nn.Sequential):
    """1x1 ConvBNReLU to ``min(in, bottleneck_width * out)`` channels, then a 3x3 ConvBNReLU
    (stride 1 or 2): [N, in, H, W] -> [N, out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bottleneck_width: int) -> None:
        inner = min(in_channels, bottleneck_width * out_channels)
        super().__init__(ConvBNReLU(in_channels, inner, 1), ConvBNReLU(inner, out_channels, 3, stride=stride))


class MSDFirstLayer(nn.Module):
    """Input [N, in_channels, H, W] -> tuple of ``len(channels)`` maps, map s
    [N, channels[s], H / (stem_stride 2^s), W / (stem_stride 2^s)] (sizes rounded up).

    Scale 0 is a 3x3 ConvBNReLU (stride ``stem_stride``) of the input; scale s > 0 a stride-2
    3x3 ConvBNReLU of scale s - 1.
    """

    def __init__(self, in_channels: int, channels: list[int], stem_stride: int = 1) -> None:
        super().__init__()
        sources = [in_channels] + channels[:-1]
        self.convs = nn.ModuleList(
            ConvBNReLU(source, out, 3, stride=stem_stride if scale == 0 else 2)
            for scale, (source, out) in enumerate(zip(sources, channels))
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        maps = []
        for conv in self.convs:
            x = conv(x)
            maps.append(x)
        return tuple(maps)


class ScaleGrowth(nn.Module):
    """New features of one scale, concatenated to its map: (finer map or None, map) -> wider map.

    [N, channels, H, W] -> [N, channels + new_channels, H, W]. Half the new channels come from
    a stride-2 conv of the next finer map [N, finer_channels, 2H, 2W] when there is one
    (``finer_channels`` not None), the rest from a conv of the map itself.
    """

    def __init__(self, finer_channels: int | None, channels: int, new_channels: int,
                 bottleneck_width: int) -> None:
        super().__init__()
        from_finer = 0 if finer_channels is None else new_channels // 2
        self.down = None if finer_channels is None else BottleneckConv(finer_channels, from_finer, 2,
                                                                       bottleneck_width)
        self.same = BottleneckConv(channels, new_channels - from_finer, 1, bottleneck_width)

    def forward(self, finer: Tensor | None, current: Tensor) -> Tensor:
        parts = [current]
        if self.down is not None:
            parts.append(self.down(finer))
        parts.append(self.same(current))
        return torch.cat(parts, dim=1)


class MSDLayer(nn.Module):
    """One dense multi-scale layer: tuple of ``len(in_channels)`` maps -> tuple of ``out_scales`` maps.

    ``in_channels[i]`` is the width of input map i; the inputs are the coarsest
    ``len(in_channels)`` of ``len(new_channels)`` scales, finest first. The output keeps the
    coarsest ``out_scales`` of them (dropping the finest when fewer), each widened by
    ``new_channels[scale]`` (see :class:`ScaleGrowth`); a kept map whose finer neighbour was
    dropped still reads it.
    """

    def __init__(self, in_channels: list[int], out_scales: int, new_channels: list[int],
                 bottleneck_width: int) -> None:
        super().__init__()
        if not 1 <= out_scales <= len(in_channels):
            raise ValueError(f"out_scales must be in [1, {len(in_channels)}], got {out_scales}")
        self.offset = len(in_channels) - out_scales
        first_scale = len(new_channels) - len(in_channels)
        self.growths = nn.ModuleList(
            ScaleGrowth(in_channels[i - 1] if i > 0 else None, in_channels[i], new_channels[first_scale + i],
                        bottleneck_width)
            for i in range(self.offset, len(in_channels))
        )
        self.out_channels = [in_channels[i] + new_channels[first_scale + i]
                             for i in range(self.offset, len(in_channels))]

    def forward(self, maps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(
            growth(maps[i - 1] if i > 0 else None, maps[i])
            for i, growth in enumerate(self.growths, start=self.offset)
        )


class CoarsestScaleHead(nn.Module):
    """Exit classifier on the coarsest map of a multi-scale state: tuple of maps -> logits [N, C]."""

    def __init__(self, in_channels: int, num_classes: int, conv_channels: int | None) -> None:
        super().__init__()
        self.head = PooledLinearHead(in_channels, num_classes, conv_channels=conv_channels, conv_stride=2)

    def forward(self, maps: tuple[Tensor, ...]) -> Tensor:
        return self.head(maps[-1])


def scales_per_block(num_exits: int, num_scales: int) -> list[int]:
    """Scales kept by each block: S - floor(b * S / K) for block b, e.g. [3, 3, 2, 1] for K=4, S=3."""
    return [num_scales - (block * num_scales) // num_exits for block in range(num_exits)]


def msdnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, num_exits: int = 4,
           num_scales: int = 3, growth: int = 4, base_channels: int = 8, layers_per_block: int = 2,
           bottleneck_width: int = 4, head_channels: int | None = 32,
           stem_stride: int = 1) -> MultiExitNetwork:
    """A small MSDNet anytime network with ``num_exits`` blocks, one exit each.

    Stage 0 is the first (multi-scale stem) layer plus block 0; stage k is block k; each
    block has ``layers_per_block`` MSD layers, its first layer dropping finest scales per
    :func:`scales_per_block`. Scale s starts with ``base_channels * 2^s`` channels and gains
    ``growth * 2^s`` per layer. Heads: 3x3 stride-2 ConvBNReLU (``head_channels``; None
    skips it) + global average pool + Linear on the coarsest scale.

    Scales run at full, 1/2, 1/4, ... input resolution. ``stem_stride=2`` starts at half
    resolution instead: about 4x fewer FLOPs (~3x faster CPU training), at some accuracy cost.

    Input:  x float [N, in_channels, image_size, image_size]
            (image_size >= stem_stride * 2^(num_scales - 1); other sizes work too).
    Output: ``forward`` returns ``num_exits`` logits, each float [N, num_classes].
    Hidden states are tuples of float maps [N, C_s, H_s, W_s] with
    H_s = H / (stem_stride 2^s) (rounded up), finest kept scale first.
    """
    check_positive_ints(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        num_exits=num_exits, num_scales=num_scales, growth=growth,
                        base_channels=base_channels, layers_per_block=layers_per_block,
                        bottleneck_width=bottleneck_width, stem_stride=stem_stride)
    if head_channels is not None:
        check_positive_ints(head_channels=head_channels)
    if image_size < stem_stride * 2 ** (num_scales - 1):
        raise ValueError(f"image_size={image_size} is too small for num_scales={num_scales} "
                         f"with stem_stride={stem_stride}")

    new_channels = [growth * 2 ** scale for scale in range(num_scales)]
    channels = [base_channels * 2 ** scale for scale in range(num_scales)]
    stages, heads = [], []
    for block, block_scales in enumerate(scales_per_block(num_exits, num_scales)):
        layers: list[nn.Module] = [MSDFirstLayer(in_channels, channels, stem_stride)] if block == 0 else []
        for _ in range(layers_per_block):
            layer = MSDLayer(channels, block_scales, new_channels, bottleneck_width)
            layers.append(layer)
            channels = layer.out_channels
        stages.append(nn.Sequential(*layers))
        heads.append(CoarsestScaleHead(channels[-1], num_classes, head_channels))
    network = MultiExitNetwork(stages, heads, num_classes=num_classes)
    init_conv_bn_linear(network)
    return network
