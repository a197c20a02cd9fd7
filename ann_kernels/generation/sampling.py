"""Token choice: greedy, or sampling with per-row temperature / top-k / top-p, by inverse CDF
on uniforms drawn from a per-call (or per-row) ``torch.Generator``.

Filtering follows Hugging Face's logits warpers in ``generate``'s order (temperature, then
top-k, then top-p; ``transformers/generation/logits_process.py``: ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``): top-k keeps the k most probable tokens (ties at
the k-th broken by sort order, where HF keeps every tied token); top-p keeps the smallest set
of most probable tokens whose probability reaches p (at least one). Shapes: logits [n, V]
(float), per-row parameters [n]; everything vectorised over rows (no per-row Python unless
rows bring their own generators).

Self-speculative sampling uses the standard rejection rule (Leviathan et al. 2023; LayerSkip
``self_speculation/self_speculation_generator.py``, ``single_step_speculation``): accept draft
token x with probability min(1, p(x) / q(x)); at the first rejection sample from
normalise(max(p - q, 0)); when every draft is accepted, sample one more token from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RowSampling", "filtered_probs", "sample_from_probs", "choose_tokens", "greedy_tokens", "token_logprobs", "draw_uniform",
           "speculative_accept"]


@dataclass
class RowSampling:
    """Per-row sampling parameters of the active rows (all [n] tensors on the model's device).
    ``do_sample`` bool; ``temperature`` float32 (> 0); ``top_k`` int64 (0 = off);
    ``top_p`` float32 in (0, 1] (1 = off). ``any_sample`` / ``plain``: host-side flags."""

    do_sample: Tensor
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    any_sample: bool
    plain: bool  # no row uses top-k or top-p


def filtered_probs(logits: Tensor, s: RowSampling) -> Tensor:
    """Probabilities [n, V] float32 (vocabulary order) after temperature, top-k, top-p."""
    z = logits.float() / s.temperature.unsqueeze(1)
    if s.plain:
        return torch.softmax(z, dim=-1)
    sorted_z, order = z.sort(dim=-1, descending=True)
    ranks = torch.arange(z.shape[-1], device=z.device).unsqueeze(0)
    k = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, z.shape[-1])).unsqueeze(1)
    sorted_z = sorted_z.masked_fill(ranks >= k, float("-inf"))
    p = torch.softmax(sorted_z, dim=-1)
    before = p.cumsum(dim=-1) - p  # probability of the strictly more probable tokens
    p = p.masked_fill((before >= s.top_p.unsqueeze(1)) & (ranks > 0), 0.0)
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(p).scatter_(1, order, p)


def sample_from_probs(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: probs [n, V] (rows sum > 0), u [n] in [0, 1) -> token ids [n] int64.
    A token of probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)
    x = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)
    last_nonzero = probs.shape[1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    return torch.minimum(idx, last_nonzero)


def draw_uniform(n: int, k: int, generator, row_generators, device) -> Tensor:
    """Uniforms [n, k] in [0, 1): one call on ``generator`` (None: torch's default), or one
    call per row for rows with their own generator (``row_generators``: None, or a list of n
    Generator-or-None, None meaning ``generator``)."""
    if row_generators is None or all(g is None for g in row_generators):
        return torch.rand(n, k, generator=generator, device=device)
    rows = [torch.rand(k, generator=g if g is not None else generator, device=device) for g in row_generators]
    return torch.stack(rows) if rows else torch.empty(0, k, device=device)


def token_logprobs(logits: Tensor, tokens: Tensor, s: RowSampling | None = None,
                   probs: Tensor | None = None) -> Tensor:
    """Log-probabilities of ``tokens`` [n, ...] (int64) under the distributions that produced
    them, from ``logits`` [n, ..., V]: greedy rows (``s`` None, or ``do_sample`` False) get
    log_softmax of the raw logits (one fused pass on CPU: cheaper than a separate max and
    logsumexp); sampling rows get the log of their filtered probabilities
    (temperature, top-k, top-p: :func:`filtered_probs`; pass them as ``probs`` [n, ..., V] when
    already computed). Returns [n, ...] in the logits' dtype (float32 for 16-bit logits)."""
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    index = tokens.unsqueeze(-1)
    plain = torch.log_softmax(z, dim=-1).gather(-1, index).squeeze(-1)
    if s is None or not s.any_sample:
        return plain
    if probs is None:
        probs = filtered_probs(logits, s)
    sampled = probs.gather(-1, index).squeeze(-1).log().to(plain.dtype)
    do_sample = s.do_sample.view(-1, *([1] * (tokens.dim() - 1)))
    return torch.where(do_sample, sampled, plain)


def greedy_tokens(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax [...] int64, its log_softmax [...]) of ``logits`` [..., V]: the logits' own
    argmax (not log_softmax's, whose rounding could tie near-equal logits), one log_softmax
    (16-bit logits read as float32) and one gather. On CPU log_softmax is a fused vectorised
    pass, cheaper than ``torch.logsumexp`` and than ``argmax`` itself."""
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    index = z.argmax(dim=-1)
    return index, torch.log_softmax(z, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def choose_tokens(logits: Tensor, s: RowSampling, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """(next tokens [n] int64, their log-probabilities [n]): argmax for greedy rows, a draw
    (uniforms ``u`` [n]) from the filtered distribution otherwise (:func:`token_logprobs`)."""
    if not s.any_sample:
        return greedy_tokens(logits)
    greedy = logits.argmax(dim=-1)
    probs = filtered_probs(logits, s)
    tokens = torch.where(s.do_sample, sample_from_probs(probs, u), greedy)
    return tokens, token_logprobs(logits, tokens, s, probs)


def speculative_accept(draft: Tensor, q: Tensor, p: Tensor, u_accept: Tensor, u_final: Tensor,
                       limit: Tensor | None = None):
    """The rejection rule for n rows and d drafted tokens, vectorised.

    Args:
        draft: [n, d] drafted tokens; q: [n, d, V] their draft distributions;
        p: [n, d + 1, V] the verifier's distributions at the d + 1 positions;
        u_accept: [n, d] and u_final: [n] uniforms;
        limit: None, or [n] int64, each row's own number of drafts (<= d; the later columns
            are ignored: the row has drafted only ``limit`` tokens).

    Returns:
        (accepted [n] int64 = m, the leading drafts kept; final [n] int64, the token after them:
        from normalise(max(p_m - q_m, 0)) when m < the row's drafts, else from p_m).
    """
    n, d = draft.shape
    gather = draft.unsqueeze(-1)
    p_x = p[:, :d].gather(2, gather).squeeze(-1)
    q_x = q.gather(2, gather).squeeze(-1)
    ok = u_accept * q_x < p_x  # u < p/q without dividing (q_x > 0: the draft drew x)
    m = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)
    drafted = torch.full_like(m, d) if limit is None else limit
    m = torch.minimum(m, drafted)
    rows = torch.arange(n, device=draft.device)
    p_m = p[rows, m]
    q_m = q[rows, m.clamp(max=d - 1)] if d > 0 else torch.zeros_like(p_m)
    residual = (p_m - q_m).clamp(min=0.0)
    use_residual = (m < drafted) & (residual.sum(dim=-1) > 0)
    final_probs = torch.where(use_residual.unsqueeze(1), residual, p_m)
    return m, sample_from_probs(final_probs, u_final)
