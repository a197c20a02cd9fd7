"""Batched early-exit generation for causal LMs on a preallocated KV cache: modes ``full``,
``static``, ``confidence`` (kv_policy ``recompute`` / ``propagate``) and ``self_speculative``,
per row at any batch size; our ``CausalExitLM`` and Hugging Face ``LlamaForCausalLM`` through
adapters. Public entry :func:`ann_kernels.generate`; :class:`DecodeState` drives a batch step
by step (rows join and leave between steps);
:class:`GenerationServer` serves requests with iteration-level batching on it. See ``docs/generation.md``."""

from ann_kernels.generation.adapters import CausalExitLMAdapter, DecoderAdapter, LlamaAdapter, as_adapter
from ann_kernels.generation.api import GenerationOutput, generate
from ann_kernels.generation.requests import Completion, ServerBusyError, StepRecord, TokenChunk, TokenStream
from ann_kernels.generation.server import GenerationServer
from ann_kernels.generation.state import DecodeState, ModeConfig, RowParams, StepEvent

__all__ = [
    "CausalExitLMAdapter",
    "Completion",
    "GenerationServer",
    "ServerBusyError",
    "StepRecord",
    "TokenChunk",
    "TokenStream",
    "DecodeState",
    "DecoderAdapter",
    "GenerationOutput",
    "LlamaAdapter",
    "ModeConfig",
    "RowParams",
    "StepEvent",
    "as_adapter",
    "generate",
]
