"""The cache-free oracle of the decoding engine: every step runs the whole model on the whole
row (``model(tokens)``: our ``CausalExitLM``'s own forward, which returns every exit's logits
[1, S, V]), so nothing of the engine (cache, masks, compaction, adapters) is involved.

``generate_reference(model, prompt, max_new_tokens, mode=..., ...)`` returns (tokens, exits)
for one row, greedy: ``full`` (the last exit's argmax), ``static`` (exit k's argmax),
``confidence`` (the first exit whose confidence, by the pure-torch reference of the fused op,
reaches its threshold, on the exact states: what ``kv_policy="recompute"`` must reproduce).
"""

from __future__ import annotations

import math

import torch

from ann_kernels.ops.early_exit import exit_confidence_reference

__all__ = ["generate_reference", "exit_logits_reference"]


@torch.inference_mode()
def exit_logits_reference(model, tokens: list[int]) -> list[torch.Tensor]:
    """Every exit's logits [V] at the last position of ``tokens`` (whole-row forward)."""
    logits = model(torch.tensor([tokens], device=next(model.parameters()).device))
    return [z[0, -1] for z in logits]


def generate_reference(model, prompt: list[int], max_new_tokens: int, *, mode: str = "full",
                       exit_index: int | None = None, threshold=None, criterion: str = "max_prob",
                       eos_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """(new tokens, exit of each) for one prompt, greedy, without a cache (module docstring)."""
    k_exits = model.num_exits
    if mode == "confidence":
        values = [threshold] * k_exits if isinstance(threshold, (int, float)) else list(threshold)
        values = (values + [-math.inf])[:k_exits] if len(values) == k_exits - 1 else values
        values[-1] = -math.inf
    toks, out, exits = list(prompt), [], []
    for _ in range(max_new_tokens):
        logits = exit_logits_reference(model, toks)
        if mode == "full":
            k = k_exits - 1
        elif mode == "static":
            k = exit_index
        elif mode == "confidence":
            k = next(i for i in range(k_exits)
                     if i == k_exits - 1 or bool(exit_confidence_reference(logits[i][None].float(), criterion)[0][0]
                                                 >= torch.tensor(values[i], dtype=torch.float32)))
        else:
            raise ValueError(f"mode: the reference has full, static and confidence, got {mode!r}")
        t = int(logits[k].argmax())
        toks.append(t)
        out.append(t)
        exits.append(k)
        if eos_token_id is not None and t == eos_token_id:
            break
    return out, exits
