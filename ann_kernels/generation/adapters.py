"""Model adapters: the few calls the decoding engine makes into a decoder-only LM.

The engine owns the KV cache and the attention (``ann_kernels.generation.cache``); a model
only has to say how to embed tokens, how to get q/k/v from a layer's input and how to finish
a layer from its attention output, and what an exit is (final norm + LM head). Two adapters:

- :class:`CausalExitLMAdapter` for our :class:`~ann_kernels.nn.causal_lm.CausalExitLM`
  (learned positions, fused qkv, pre-norm GELU blocks, exits at ``model.exit_layers``);
- :class:`LlamaAdapter` for a Hugging Face ``LlamaForCausalLM`` (RoPE, GQA, RMSNorm,
  SwiGLU), exits at chosen layers, each exit = ``model.model.norm`` + ``lm_head`` (the
  LayerSkip convention: ``self_speculation/llama_model_utils.py``, ``forward_early``).

Shapes: n rows, s positions per row, D = hidden size, Hq / Hkv heads of size d.
``embed(tokens [n, s] int64, positions [n, s] int64) -> [n, s, D]``;
``qkv(i, h [n, s, D], rope) -> q [n, Hq, s, d], k, v [n, Hkv, s, d]``;
``finish_layer(i, h, attn [n, s, Hq * d]) -> [n, s, D]``; ``exit_logits(h [..., D]) -> [..., V]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ann_kernels.nn.causal_lm import CausalExitLM

__all__ = ["DecoderAdapter", "CausalExitLMAdapter", "LlamaAdapter", "as_adapter"]


class DecoderAdapter:
    """Base: attributes every adapter sets, and :meth:`layer` (one layer without a cache)."""

    num_layers: int
    exit_layers: list[int]  # ascending, the last = num_layers - 1
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_len: int  # positions 0 .. max_len - 1
    dtype: torch.dtype
    device: torch.device
    #: the K/V projections' share of one layer's FLOPs per token (for kv_policy="propagate")
    kv_flops_fraction: float

    def rope(self, positions: Tensor, like: Tensor):
        """Per-forward positional state shared by every layer (None without RoPE)."""
        return None

    def exit_head(self, exit_id: int):
        """(norm callable, weight [V, D], bias [V] or None): exit ``exit_id`` is
        ``F.linear(norm(h), weight, bias)``; None when the exit is not of that form (the
        self-speculative candidate draft head then uses ``exit_logits``)."""
        return None

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)


def _check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> list[int]:
    layers = sorted({int(i) for i in exit_layers} | {num_layers - 1})
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"exit_layers: expected layer indices in [0, {num_layers}), got {list(exit_layers)}")
    return layers


class CausalExitLMAdapter(DecoderAdapter):
    """Our ``CausalExitLM``: blocks gathered from its stages, in order; exits at its
    ``exit_layers`` (final norm + the exit's LM head)."""

    def __init__(self, model):
        blocks = [b for stage in model.stages for b in stage.blocks]
        self.model, self.blocks = model, blocks
        self.embedding = model.stages[0].embedding
        self.num_layers = len(blocks)
        self.exit_layers = list(model.exit_layers)
        self.heads = list(model.heads)
        first = blocks[0]
        self.num_heads = self.num_kv_heads = first.heads
        self.hidden_size = first.qkv.in_features
        self.head_dim = self.hidden_size // first.heads
        self.vocab_size = self.embedding.token.num_embeddings
        self.max_len = int(model.max_len)
        p = first.qkv.weight
        self.dtype, self.device = p.dtype, p.device
        layer_params = sum(x.numel() for x in first.parameters())
        self.kv_flops_fraction = 2 * self.hidden_size * self.hidden_size / layer_params
        # The blocks' tensors, read once: the decode loop calls F.* on them directly (the
        # nn.Module call machinery costs ~10% of a small model's decode step).
        self.weights = [self._block_weights(b) for b in blocks]
        self.head_weights = [self._head_weights(h) for h in self.heads]
        self.position_table = self.embedding.position[0]  # [max_len, D] (a view: follows the parameter)
        self.max_position = self.position_table.shape[0] - 1
        token = self.embedding.token
        self.token_table = token.weight if token.max_norm is None else None

    @staticmethod
    def _block_weights(b):
        fc1, act, fc2 = b.mlp[0], b.mlp[1], b.mlp[2]
        if not (isinstance(fc1, nn.Linear) and isinstance(act, nn.GELU) and isinstance(fc2, nn.Linear)):
            return None
        return ((b.norm1.normalized_shape, b.norm1.weight, b.norm1.bias, b.norm1.eps), (b.qkv.weight, b.qkv.bias),
                (b.proj.weight, b.proj.bias),
                (b.norm2.normalized_shape, b.norm2.weight, b.norm2.bias, b.norm2.eps),
                (fc1.weight, fc1.bias), act.approximate, (fc2.weight, fc2.bias))

    @staticmethod
    def _head_weights(head):
        """(norm shape, weight, bias, eps, lm_head weight, bias) of a LayerNorm + Linear exit, else None."""
        norm, lm = getattr(head, "norm", None), getattr(head, "lm_head", None)
        if not (isinstance(norm, nn.LayerNorm) and isinstance(lm, nn.Linear)):
            return None
        return (norm.normalized_shape, norm.weight, norm.bias, norm.eps), (lm.weight, lm.bias)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        pos = self.position_table
        tok = self.embedding.token(tokens) if self.token_table is None else F.embedding(tokens, self.token_table)
        return tok + pos[positions.clamp(max=self.max_position)]

    def qkv(self, i: int, h: Tensor, rope):
        n, s, d = h.shape
        w = self.weights[i]
        if w is None:
            block = self.blocks[i]
            x = block.qkv(block.norm1(h))
        else:
            x = F.linear(F.layer_norm(h, *w[0]), *w[1])
        return x.view(n, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def kv(self, i: int, h: Tensor, rope):
        """k, v [n, H, s, d] only (kv_policy="propagate"): the last 2D rows of the fused qkv."""
        block = self.blocks[i]
        n, s, d = h.shape
        w, b = block.qkv.weight[d:], block.qkv.bias[d:] if block.qkv.bias is not None else None
        kv = nn.functional.linear(block.norm1(h), w, b).view(n, s, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return k, v

    def finish_layer(self, i: int, h: Tensor, attn: Tensor) -> Tensor:
        w = self.weights[i]
        if w is None:
            block = self.blocks[i]
            h = h + block.proj(attn)
            return h + block.mlp(block.norm2(h))
        h = h + F.linear(attn, *w[2])
        return h + F.linear(F.gelu(F.linear(F.layer_norm(h, *w[3]), *w[4]), approximate=w[5]), *w[6])

    def exit_logits(self, h: Tensor, exit_id: int) -> Tensor:
        w = self.head_weights[exit_id]
        if w is None:
            return self.heads[exit_id](h)
        return F.linear(F.layer_norm(h, *w[0]), *w[1])

    def exit_head(self, exit_id: int):
        """(norm callable, weight [V, D], bias [V] or None) of exit ``exit_id``."""
        head = self.heads[exit_id]
        return head.norm, head.lm_head.weight, head.lm_head.bias


class LlamaAdapter(DecoderAdapter):
    """A Hugging Face ``LlamaForCausalLM``: exit k after layer ``exit_layers[k]`` is
    ``lm_head(model.model.norm(h))`` (the last exit = the model's own logits)."""

    def __init__(self, model, exit_layers: Sequence[int] | None = None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._apply_rope = apply_rotary_pos_emb
        self.model = model
        inner = model.model
        cfg = model.config
        self.layers = list(inner.layers)
        self.num_layers = len(self.layers)
        self.exit_layers = _check_exit_layers(exit_layers if exit_layers is not None else [], self.num_layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        self.max_len = int(cfg.max_position_embeddings)
        self.scaling = float(attn.scaling)
        self.embed_tokens, self.norm, self.lm_head, self.rotary = inner.embed_tokens, inner.norm, model.lm_head, inner.rotary_emb
        p = self.embed_tokens.weight
        self.dtype, self.device = p.dtype, p.device
        layer_params = sum(x.numel() for x in self.layers[0].parameters())
        kv_params = attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
        self.kv_flops_fraction = kv_params / layer_params

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.embed_tokens(tokens)

    def rope(self, positions: Tensor, like: Tensor):
        return self.rotary(like, positions)

    def _heads(self, projection, x: Tensor) -> Tensor:
        """[n, s, heads * head_dim] projection of x -> [n, heads, s, head_dim]."""
        n, s, _ = x.shape
        return projection(x).view(n, s, -1, self.head_dim).transpose(1, 2)

    def qkv(self, i: int, h: Tensor, rope):
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = self._heads(attn.q_proj, x), self._heads(attn.k_proj, x), self._heads(attn.v_proj, x)
        cos, sin = rope
        q, k = self._apply_rope(q, k, cos, sin)
        return q, k, v

    def kv(self, i: int, h: Tensor, rope):
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        k, v = self._heads(attn.k_proj, x), self._heads(attn.v_proj, x)
        cos, sin = rope
        # apply_rotary_pos_emb rotates both arguments: rotate k alone by passing it twice.
        k, _ = self._apply_rope(k, k, cos, sin)
        return k, v

    def finish_layer(self, i: int, h: Tensor, attn_out: Tensor) -> Tensor:
        layer = self.layers[i]
        h = h + layer.self_attn.o_proj(attn_out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def exit_logits(self, h: Tensor, exit_id: int) -> Tensor:
        return self.lm_head(self.norm(h))

    def exit_head(self, exit_id: int):
        """(norm callable, weight [V, D], bias [V] or None) of exit ``exit_id``."""
        return self.norm, self.lm_head.weight, self.lm_head.bias


def as_adapter(model, exit_layers: Sequence[int] | None = None) -> DecoderAdapter:
    """The adapter for ``model``: an adapter as is; our ``CausalExitLM`` (its own exits;
    ``exit_layers`` must be None); a ``transformers`` ``LlamaForCausalLM`` with exits after
    ``exit_layers`` (plus the last layer)."""
    if isinstance(model, DecoderAdapter):
        return model
    if isinstance(model, CausalExitLM):
        if exit_layers is not None:
            raise ValueError("exit_layers: a CausalExitLM has its own exits (model.exit_layers); pass None")
        return CausalExitLMAdapter(model)
    if type(model).__name__ == "LlamaForCausalLM" and type(model).__module__.startswith("transformers"):
        return LlamaAdapter(model, exit_layers)
    raise TypeError(f"model: expected a CausalExitLM, a transformers LlamaForCausalLM or a DecoderAdapter, "
                    f"got {type(model).__name__}")
