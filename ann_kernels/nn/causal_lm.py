"""A causal multi-exit transformer language model on the ``MultiExitNetwork`` interface.

Exits sit after chosen layers (``exit_layers``, 0-based, the last one = the last layer).
Every exit applies the same final norm and then the LM head (LayerSkip / EE-LLM style):
one head shared by all exits (``shared_head=True``; its weight optionally tied to the token
embedding) or one head per exit. Stage k runs the layers between exit k-1 and exit k;
stage 0 also embeds the tokens (learned positions).

Shapes: tokens [B, S] int64 -> hidden [B, S, D] -> logits [B, S, V] per exit.
``forward_hidden`` returns the K normed hidden states, which is what the fused linear loss
(:class:`ann_kernels.AnytimeLinearLoss`) takes instead of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ann_kernels.nn.multi_exit import MultiExitNetwork

__all__ = ["CausalBlock", "CausalExitLM", "TokenEmbedding", "causal_exit_lm", "layer_dropout_probs"]


def layer_dropout_probs(num_layers: int, prob_max: float, scale: str = "exp") -> list[float]:
    """LayerSkip's per-layer drop rates: ``prob_max * scale(l)`` for 0-based layer l, with
    torchtune's ``get_scale(scale, L - 1, l)`` (``torchtune/modules/layer_dropout.py``,
    ``create_layer_dropout_modules``; LayerSkip's default ``exp``: 2^(l / (L-1)) - 1, so
    layer 0 never drops and the last layer drops with ``prob_max``)."""
    if not 0.0 <= prob_max < 1.0:
        raise ValueError(f"layer_dropout: expected a probability in [0, 1), got {prob_max!r}")
    period = num_layers - 1
    scales = {"uniform": lambda v: 1.0, "exp": lambda v: math.exp(v * math.log(2) / period) - 1,
              "linear": lambda v: v / period, "log": lambda v: math.log(v + 1) / math.log(period + 1),
              "sin": lambda v: math.sin(0.5 * math.pi * v / period),
              "sigmoid": lambda v: 1 / (1 + math.exp(-10 * (v / period - 0.5)))}
    if scale not in scales:
        raise ValueError(f"layer_dropout_scale: expected one of {sorted(scales)}, got {scale!r}")
    return [prob_max * (1.0 if period == 0 else scales[scale](v)) for v in range(num_layers)]


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention (SDPA) and a GELU MLP.

    ``layer_drop``: in training, each sequence of the batch skips the whole block (identity)
    with this probability (torchtune's ``LayerDropout`` along dim 0, which LayerSkip trains
    with: the kept rows run the block, the others pass through unscaled). Drawn from the
    global torch RNG, so a checkpoint's saved RNG state resumes the same draws."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0, layer_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: dim = {dim} must be divisible by heads = {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.dropout, self.layer_drop = dropout, float(layer_drop)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.layer_drop > 0):
            return self._block(x)
        # 1. per-sequence skip draw; 2. run the block on the kept rows only (an empty
        # batch still touches every parameter, so DDP sees them all); 3. scatter back.
        keep = (torch.rand(x.shape[0]) >= self.layer_drop).nonzero().squeeze(1).to(x.device)
        out = x.clone()
        out[keep] = self._block(x.index_select(0, keep))
        return out

    def _block(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class TokenEmbedding(nn.Module):
    """tokens [B, S] -> token + learned position embeddings [B, S, D] (S <= max_len)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.position.shape[1]:
            raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_len {self.position.shape[1]}")
        return self.token(tokens) + self.position[:, : tokens.shape[1]]


class _Stage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], embedding: nn.Module | None = None):
        super().__init__()
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        for block in self.blocks:
            x = block(x)
        return x


class LMExitHead(nn.Module):
    """hidden [B, S, D] -> final norm -> LM head -> logits [B, S, V]."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(h))


class CausalExitLM(MultiExitNetwork):
    """See the module docstring. ``lm_heads``: the K heads (the same module K times when
    shared); ``norm``: the final norm every exit applies; ``exit_layers``: layer indices."""

    def __init__(self, stages, heads, *, vocab_size: int, exit_layers: Sequence[int], num_layers: int,
                 norm: nn.Module, max_len: int):
        super().__init__(stages, heads, num_classes=vocab_size)
        self.exit_layers, self.num_layers, self.norm, self.max_len = list(exit_layers), num_layers, norm, max_len

    @property
    def lm_heads(self) -> list[nn.Linear]:
        return [head.lm_head for head in self.heads]

    @property
    def shared_head(self) -> bool:
        return all(h is self.lm_heads[0] for h in self.lm_heads)

    def forward_hidden(self, tokens: Tensor) -> list[Tensor]:
        """The K exits' hidden states after the final norm, each [B, S, D]."""
        out, h = [], tokens
        for k in range(self.num_exits):
            h = self.forward_stage(k, h)
            out.append(self.norm(h))
        return out

    def per_token_exit_flops(self, seq_len: int) -> Tensor:
        """float64 [K]: FLOPs per token to reach and evaluate each exit at ``seq_len``."""
        example = torch.zeros(1, seq_len, dtype=torch.long, device=next(self.parameters()).device)
        return self.exit_flops(example) / seq_len


def causal_exit_lm(vocab_size: int, *, dim: int = 128, layers: int = 4, heads: int = 4, max_len: int = 128,
                   exit_layers: Sequence[int] | None = None, num_exits: int | None = None,
                   shared_head: bool = True, tie_embeddings: bool = True, mlp_ratio: int = 4,
                   dropout: float = 0.0, layer_dropout: float = 0.0,
                   layer_dropout_scale: str = "exp") -> CausalExitLM:
    """Build a :class:`CausalExitLM`.

    Args:
        vocab_size: V. dim / layers / heads / max_len: the transformer's size.
        exit_layers: 0-based layers with an exit (ascending; the last layer is added if
            missing). Default: ``num_exits`` exits evenly spaced (default: after every layer).
        shared_head: one LM head for every exit (else one per exit).
        tie_embeddings: the (shared) head's weight is the token embedding (needs shared_head).
        layer_dropout, layer_dropout_scale: LayerSkip's layer dropout in training, the
            maximum rate and its growth over depth (:func:`layer_dropout_probs`; 0 = off).
    """
    for name, v in (("vocab_size", vocab_size), ("dim", dim), ("layers", layers), ("heads", heads),
                    ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if exit_layers is None:
        n = layers if num_exits is None else int(num_exits)
        if not 1 <= n <= layers:
            raise ValueError(f"num_exits: expected 1..{layers} (one exit per layer at most), got {num_exits!r}")
        exit_layers = sorted({round((k + 1) * layers / n) - 1 for k in range(n)})
    exit_layers = sorted({int(i) for i in exit_layers} | {layers - 1})
    if exit_layers[0] < 0 or exit_layers[-1] >= layers:
        raise ValueError(f"exit_layers: expected layer indices in [0, {layers}), got {exit_layers}")
    if tie_embeddings and not shared_head:
        raise ValueError("tie_embeddings: needs shared_head=True (one head to tie to the embedding)")
    embedding = TokenEmbedding(vocab_size, dim, max_len)
    drops = layer_dropout_probs(layers, float(layer_dropout), layer_dropout_scale)
    blocks = [CausalBlock(dim, heads, mlp_ratio, dropout, drops[i]) for i in range(layers)]
    stages, start = [], 0
    for k, end in enumerate(exit_layers):
        stages.append(_Stage(blocks[start:end + 1], embedding if k == 0 else None))
        start = end + 1
    norm = nn.LayerNorm(dim)

    def new_head() -> nn.Linear:
        head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(head.weight, std=0.02)
        return head

    if shared_head:
        lm_head = new_head()
        if tie_embeddings:
            lm_head.weight = embedding.token.weight
        heads_ = [LMExitHead(norm, lm_head)] * len(exit_layers)
    else:
        heads_ = [LMExitHead(norm, new_head()) for _ in exit_layers]
    return CausalExitLM(stages, heads_, vocab_size=vocab_size, exit_layers=exit_layers, num_layers=layers,
                        norm=norm, max_len=max_len)
