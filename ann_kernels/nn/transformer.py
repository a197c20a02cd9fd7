"""A small vision transformer with an exit after every encoder layer, all exits sharing one head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ann_kernels.nn._checks import check_positive_ints
from ann_kernels.nn.heads import ClassTokenHead
from ann_kernels.nn.multi_exit import MultiExitNetwork

__all__ = ["exit_transformer", "PatchEmbedding", "EncoderBlock"]


class PatchEmbedding(nn.Module):
    """Image [N, in_channels, H, W] -> tokens [N, 1 + P, dim]: class token, then P patch tokens,
    plus learned position embeddings.

    The image is zero-padded on the right/bottom to a multiple of ``patch_size``, so
    P = ceil(H / patch_size) * ceil(W / patch_size); ``image_size`` fixes P for the
    position embeddings (other sizes raise on the shape mismatch).
    """

    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patches_per_side = -(-image_size // patch_size)
        self.projection = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 1 + patches_per_side ** 2, dim))
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size, (-x.shape[-1]) % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        patches = self.projection(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return tokens + self.position


class EncoderBlock(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)) (GELU). [N, T, dim] -> [N, T, dim]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by heads={num_heads}")
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        n, t, dim = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(n, t, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, dim)
        x = x + self.attn_out(attended)
        return x + self.mlp(self.mlp_norm(x))


def exit_transformer(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch_size: int = 7,
                     dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: float = 2) -> MultiExitNetwork:
    """A ViT with ``depth`` encoder layers and an exit after each one (``depth`` exits).

    Stage 0 is the patch embedding plus layer 0; stage k is layer k. Every exit uses the
    SAME head module (LayerNorm + Linear on the class token), so ``heads`` holds one module
    ``depth`` times: its parameters are registered once and its FLOPs count at every exit.

    Input:  x float [N, in_channels, image_size, image_size] (padded to a multiple of
            ``patch_size``; 28 / 7 gives 16 patches, 32 / 7 gives 25).
    Output: ``forward`` returns ``depth`` logits, each float [N, num_classes].
    Hidden states are float tokens [N, 1 + P, dim] (class token first).
    """
    check_positive_ints(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        patch_size=patch_size, dim=dim, depth=depth, heads=heads)
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
    blocks = [EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)]
    stages = [nn.Sequential(PatchEmbedding(in_channels, image_size, patch_size, dim), blocks[0]), *blocks[1:]]
    shared_head = ClassTokenHead(dim, num_classes)
    network = MultiExitNetwork(stages, [shared_head] * depth, num_classes=num_classes)
    for module in network.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return network
