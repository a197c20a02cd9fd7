"""``ann_kernels.generate``: batched early-exit generation on a KV cache (one call = one
:class:`~ann_kernels.generation.state.DecodeState` filled with the prompts and stepped until
every row has finished).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ann_kernels.generation.adapters import DecoderAdapter, as_adapter
from ann_kernels.generation.row_policy import FINISHED_ROW_POLICIES
from ann_kernels.generation.state import MODES, DecodeState, ModeConfig, RowParams
from ann_kernels.ops.early_exit import CRITERIA

__all__ = ["GenerationOutput", "generate", "prompts_to_lists", "build_mode_config", "check_prompts"]

KV_POLICIES = ("recompute", "propagate")


@dataclass
class GenerationOutput:
    """``tokens``: B lists of new token ids (prompt excluded; EOS included when hit);
    ``exit_index``: B lists, the exit (0-based) whose logits produced each new token;
    ``stats``: dict (see :func:`generate`); ``logprobs``: B lists of floats, each new token's
    natural-log probability under the distribution that produced it (see :func:`generate`)."""

    tokens: list[list[int]]
    exit_index: list[list[int]]
    stats: dict
    logprobs: list[list[float]] = field(default_factory=list)


def prompts_to_lists(prompts, attention_mask=None) -> list[list[int]]:
    """A list of token-id lists, or a [B, S] integer tensor (with an optional [B, S]
    ``attention_mask``: the tokens where it is 1, left or right padding) -> B lists."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError(f"prompts: expected a [B, S] integer tensor, got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        if attention_mask is None:
            return prompts.tolist()
        mask = torch.as_tensor(attention_mask)
        if mask.shape != prompts.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(prompts.shape)} like prompts, "
                             f"got {tuple(mask.shape)}")
        return [row[m.bool()].tolist() for row, m in zip(prompts.cpu(), mask.cpu())]
    if attention_mask is not None:
        raise ValueError("attention_mask: only with a [B, S] tensor of prompts")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of token-id lists or a [B, S] tensor, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise ValueError(f"prompts[{i}]: expected a list of token ids, got {type(p).__name__}")
        out.append([int(t) for t in p])
    return out


def check_prompts(prompts: list[list[int]], vocab_size: int, max_len: int, max_new: list[int],
                  extra: int = 0) -> None:
    """Empty prompts, ids outside [0, vocab_size) and prompt + max_new_tokens > max_len raise."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}]: empty prompt (a row needs at least one token)")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompts[{i}]: token id {bad} is out of range [0, {vocab_size})")
        if len(p) + max_new[i] > max_len:
            raise ValueError(f"max_new_tokens: prompts[{i}] has {len(p)} tokens; {len(p)} + max_new_tokens "
                             f"{max_new[i]} = {len(p) + max_new[i]} exceeds the model's max length {max_len}")


def _check_thresholds(threshold, num_exits: int) -> tuple[float, ...]:
    if threshold is None:
        raise ValueError("threshold: mode='confidence' needs a threshold (one number, or one per exit); "
                         "calibrate one for a budget with ann_kernels.generation.calibrate_generation")
    if hasattr(threshold, "thresholds"):  # a calibration result
        threshold = threshold.thresholds
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.tolist()
    values = [threshold] * num_exits if isinstance(threshold, (int, float)) else list(threshold)
    if len(values) == num_exits - 1:
        values = values + [-math.inf]
    if len(values) != num_exits:
        raise ValueError(f"threshold: expected one number or {num_exits - 1} / {num_exits} (one per exit), "
                         f"got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"threshold: expected numbers (not NaN), got {threshold!r}")
    return tuple(float(v) for v in values)


def build_mode_config(adapter: DecoderAdapter, mode: str, *, exit_index=None, draft_len: int = 4, threshold=None,
                      criterion: str = "max_prob", kv_policy: str = "recompute", verify_chunk=None,
                      finished_rows: str = "auto", draft_confidence=None, draft_candidates: int = 0) -> ModeConfig:
    """Validate the mode arguments of :func:`generate` against the model's exits."""
    k_exits = adapter.num_exits
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {sorted(CRITERIA)}, got {criterion!r}")
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy: expected one of {list(KV_POLICIES)}, got {kv_policy!r}")
    if mode in ("static", "self_speculative"):
        hi = k_exits - 1 if mode == "static" else k_exits - 2
        if exit_index is None:
            raise ValueError(f"exit_index: mode={mode!r} needs an exit in [0, {hi}]")
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or not 0 <= exit_index <= hi:
            raise ValueError(f"exit_index: {exit_index!r} is out of range [0, {hi}] for mode={mode!r} "
                             f"(the model has {k_exits} exits)")
    elif exit_index is not None:
        raise ValueError(f"exit_index: only for mode='static' or 'self_speculative', got {exit_index!r} with "
                         f"mode={mode!r}")
    if finished_rows not in FINISHED_ROW_POLICIES:
        raise ValueError(f"finished_rows: expected one of {list(FINISHED_ROW_POLICIES)}, got {finished_rows!r}")
    if mode == "self_speculative":
        if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
            raise ValueError(f"draft_len: expected an int >= 1, got {draft_len!r}")
        if draft_confidence is not None and (isinstance(draft_confidence, bool)
                                             or not isinstance(draft_confidence, (int, float))
                                             or not 0 <= draft_confidence <= 1):
            raise ValueError(f"draft_confidence: expected None or a number in [0, 1], got {draft_confidence!r}")
        if isinstance(draft_candidates, bool) or not isinstance(draft_candidates, int) or draft_candidates < 0:
            raise ValueError(f"draft_candidates: expected an int >= 0 (0 = the whole vocabulary), got {draft_candidates!r}")
        if verify_chunk is not None and (not isinstance(verify_chunk, int) or verify_chunk < 1):
            raise ValueError(f"verify_chunk: expected None or an int >= 1, got {verify_chunk!r}")
    thresholds = _check_thresholds(threshold, k_exits) if mode == "confidence" else None
    return ModeConfig(mode=mode, exit_index=exit_index, draft_len=int(draft_len), thresholds=thresholds,
                      criterion=criterion, kv_policy=kv_policy, verify_chunk=verify_chunk,
                      finished_rows=finished_rows,
                      draft_confidence=None if draft_confidence is None else float(draft_confidence),
                      draft_candidates=int(draft_candidates))


def _per_row(value, b: int, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * b
    if len(values) != b:
        raise ValueError(f"{name}: expected one int or {b} (one per prompt), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected ints >= 1, got {value!r}")
    return values


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=64, mode: str = "full", exit_index: int | None = None,
             draft_len: int = 4, threshold=None, criterion: str = "max_prob", kv_policy: str = "recompute",
             eos_token_id=None, do_sample: bool = False, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, attention_mask=None,
             exit_layers=None, verify_chunk: int | None = None, max_batch_size: int | None = None,
             finished_rows: str = "auto", draft_confidence: float | None = None,
             draft_candidates: int = 0) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens per prompt with early exits.

    Args:
        model: our :class:`~ann_kernels.nn.causal_lm.CausalExitLM`, a ``transformers``
            ``LlamaForCausalLM`` (exits after ``exit_layers`` + the last layer, each = the
            final norm + ``lm_head``), or a :class:`DecoderAdapter`.
        prompts: B lists of token ids, or a [B, S] tensor (with ``attention_mask``).
        max_new_tokens: an int, or one per prompt.
        mode: ``full`` | ``static`` (every token from ``exit_index``) | ``confidence``
            (first exit whose ``criterion`` confidence >= ``threshold``: one number, K - 1 or K
            per exit, or a calibration result; ``kv_policy`` recompute | propagate) |
            ``self_speculative`` (draft ``draft_len`` tokens from ``exit_index``, verify with
            the rest; ``verify_chunk=1`` verifies one position at a time; ``draft_confidence``
            p: a row stops drafting after a draft token of draft probability < p;
            ``draft_candidates`` K > 0: greedy drafts are the argmax over a cached candidate
            set, the prompts' and generated tokens plus the verifier's top K per position).
        eos_token_id: None, an id or a list of ids; a row stops after one (kept in its tokens).
        do_sample, temperature, top_k, top_p, generator: sampling (greedy by default); the
            draws come from ``generator`` (torch's default when None).
        max_batch_size: rows decoded at once (default: all prompts); more prompts wait for
            free slots (rows join as others finish).
        finished_rows: rows that finish while others decode on leave the batch ("compact"),
            stay in it masked ("mask"), or either per step, the cheaper by a cost model
            measured once per model and cache shape ("auto"); the output is the same.

    Returns:
        :class:`GenerationOutput`. ``logprobs``: per new token, its log-probability under the
        distribution it was chosen from: log_softmax of the producing exit's logits (greedy
        rows), or the log of the producing exit's probabilities after temperature, top-k and
        top-p (sampling rows). ``self_speculative``: always the verifying (last) exit's
        distribution, for accepted drafts too (``exit_index`` still names the draft exit k
        for them): greedy output equals ``full``'s and so do its log-probabilities; sampled
        output follows that distribution (the rejection rule), so the residual a rejected
        position draws from is not reported. ``stats``: ``prefill_tokens``, ``prefill_s``,
        ``prefill_tokens_per_s``, ``decode_s``, ``new_tokens``, ``decode_tokens_per_s``,
        ``steps``, ``mean_exit``, ``exit_counts``, ``layer_fraction`` (layer evaluations per
        new token / layers; ``propagate``'s K/V writes count as their FLOP share of a layer;
        self-speculative drafts and rejected positions count), ``acceptance_rate`` and
        ``tokens_per_verify`` (self-speculative), ``compactions`` and ``masked_steps``
        (steps that compacted finished rows / ran with masked rows), ``mode``.
    """
    adapter = as_adapter(model, exit_layers)
    rows = prompts_to_lists(prompts, attention_mask)
    b = len(rows)
    if b == 0:
        raise ValueError("prompts: expected at least one prompt, got none")
    max_new = _per_row(max_new_tokens, b, "max_new_tokens")
    check_prompts(rows, adapter.vocab_size, adapter.max_len, max_new)
    config = build_mode_config(adapter, mode, exit_index=exit_index, draft_len=draft_len, threshold=threshold,
                               criterion=criterion, kv_policy=kv_policy, verify_chunk=verify_chunk,
                               finished_rows=finished_rows, draft_confidence=draft_confidence,
                               draft_candidates=draft_candidates)
    if do_sample:
        check_sampling(temperature, top_k, top_p)
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < adapter.vocab_size:
                raise ValueError(f"eos_token_id: expected ids in [0, {adapter.vocab_size}), got {eos_token_id!r}")
    slots = b if max_batch_size is None else int(max_batch_size)
    if slots < 1:
        raise ValueError(f"max_batch_size: expected an int >= 1, got {max_batch_size!r}")
    slots = min(slots, b)
    max_positions = max(len(p) + m for p, m in zip(rows, max_new))
    state = DecodeState(adapter, config, max_batch_size=slots, max_positions=max_positions,
                        eos_token_id=eos_token_id, generator=generator)
    params = [RowParams(max_new_tokens=m, do_sample=bool(do_sample), temperature=float(temperature),
                        top_k=int(top_k), top_p=float(top_p)) for m in max_new]
    tokens: list[list[int]] = [[] for _ in range(b)]
    exits: list[list[int]] = [[] for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    waiting = 0
    while waiting < b or state.num_rows:
        free = slots - state.num_rows
        if waiting < b and free > 0:
            take = list(range(waiting, min(b, waiting + free)))
            state.add_rows([rows[i] for i in take], [params[i] for i in take], take)
            waiting += len(take)
        for ev in state.step():
            tokens[ev.row_id].extend(ev.tokens)
            exits[ev.row_id].extend(ev.exits)
            logprobs[ev.row_id].extend(ev.logprobs)
    return GenerationOutput(tokens, exits, generation_stats(state, config, adapter), logprobs)


def generation_stats(state: DecodeState, config: ModeConfig, adapter: DecoderAdapter) -> dict:
    """``out.stats`` from a decode state's counters (see :func:`generate`)."""
    c = state.counters
    new = max(c.new_tokens, 1)
    stats = {
        "mode": config.mode,
        "prefill_tokens": c.prefill_tokens,
        "prefill_s": c.prefill_s,
        "prefill_tokens_per_s": c.prefill_tokens / c.prefill_s if c.prefill_s > 0 else float("nan"),
        "new_tokens": c.new_tokens,
        "decode_s": c.decode_s,
        "decode_tokens_per_s": c.new_tokens / c.decode_s if c.decode_s > 0 else float("nan"),
        "steps": c.steps,
        "mean_exit": c.exit_sum / new,
        "exit_counts": list(c.exit_counts),
        "layer_fraction": c.layer_evals / (new * adapter.num_layers),
        "compactions": c.compactions,
        "masked_steps": c.masked_steps,
    }
    if config.mode == "self_speculative":
        stats["acceptance_rate"] = c.accepted / c.drafted if c.drafted else float("nan")
        stats["tokens_per_verify"] = c.new_tokens / c.verify_rows if c.verify_rows else float("nan")
    return stats
