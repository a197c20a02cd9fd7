"""The cache-free oracle of the decoding engine: every step runs the whole model on the whole
row (``model(tokens)``: our ``CausalExitLM``'s own forward, which returns every exit's logits
[1, S, V]), so nothing of the engine (cache, masks, compaction, adapters) is involved.

``generate_reference(model, prompt, max_new_tokens, mode=..., ...)`` returns (tokens, exits)
for one row, greedy: ``full`` (the last exit's argmax), ``static`` (exit k's argmax),
``confidence`` (the first exit whose confidence, by the pure-torch reference of the fused op,
reaches its threshold, on the exact states: what ``kv_policy="recompute"`` must reproduce).
``token_logprobs_reference`` scores generated tokens the same way: one whole-row forward, the
log-probability of each token at the exit that produced it (float64; sampling filters
written out token by token, apart from the engine's vectorised ``sampling.filtered_probs``).
"""

from __future__ import annotations

import math

import torch

from ann_kernels.ops.early_exit import exit_confidence_reference

__all__ = ["generate_reference", "exit_logits_reference", "token_logprobs_reference"]


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


def _filtered_log_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """log p [V] float64 after temperature, top-k (the k most probable), top-p (the most
    probable tokens until the ones before reach top_p), renormalised; -inf outside."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = sorted(range(p.numel()), key=lambda t: -float(p[t]))
    kept = order[:top_k] if top_k > 0 else order
    mass = sum(float(p[t]) for t in kept)
    chosen, before = [], 0.0
    for t in kept:
        if chosen and before >= top_p:
            break
        chosen.append(t)
        before += float(p[t]) / mass
    out = torch.full_like(p, -math.inf)
    total = sum(float(p[t]) for t in chosen)
    for t in chosen:
        out[t] = math.log(float(p[t]) / total)
    return out


@torch.inference_mode()
def token_logprobs_reference(model, prompt: list[int], tokens: list[int], exits: list[int], *,
                             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0) -> list[float]:
    """Log-probabilities (float64) of the new ``tokens`` after ``prompt``, token j under exit
    ``exits[j]``'s logits at its position (one forward of prompt + tokens[:-1]): greedy,
    log_softmax; sampling, the log of the probabilities after temperature, top-k, top-p."""
    row = list(prompt) + list(tokens[:-1])
    all_logits = model(torch.tensor([row], device=next(model.parameters()).device))
    out = []
    for j, (t, e) in enumerate(zip(tokens, exits)):
        z = all_logits[e][0, len(prompt) - 1 + j].double()
        lp = _filtered_log_probs(z, temperature, top_k, top_p) if do_sample else torch.log_softmax(z, dim=-1)
        out.append(float(lp[t]))
    return out
