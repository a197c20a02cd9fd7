"""One decode step of every active row, per mode. Each function takes the decode state
(:class:`ann_kernels.generation.state.DecodeState`) and the number of active rows n, runs the
model on the cache, updates ``seg_len`` / ``hidden`` / the counters, and returns
(tokens [n, c] int64, exits [n, c] int64, counts [n], logprobs [n, c] float; or [n] each
when every row gets exactly one token): the c-wide new tokens of each row, the exit that produced each, how many are valid, and each token's
log-probability under the distribution it was drawn from (``sampling.token_logprobs``: the
producing exit's logits, filtered when the row samples; self-speculative: the verifying
exit's, for accepted drafts too: the distribution the output follows). The state appends
them (EOS, max_new_tokens).

- ``full`` / ``static``: the row's last token through segments 0..k, the token from exit k.
- ``self_speculative`` (LayerSkip, ``self_speculation/self_speculation_generator.py``,
  ``SelfSpeculativeGenerationStrategy.single_step_speculation``; ``llama_model_utils.py``,
  ``forward_early`` / ``forward_remainder`` / ``crop_past_key_values``): d draft tokens
  through the layers up to exit k (keeping their exit states), then the last draft
  through those layers, then the layers after exit k over the d + 1 positions since the last
  full pass in one pass (reading the early layers' cache the drafts wrote). Each row keeps
  its longest agreeing prefix m plus one verified token and crops its cache to its own
  length; no row waits for another (LayerSkip hard-wires batch 1). Greedy rows compare
  argmaxes; sampling rows use the rejection rule (``sampling.speculative_accept``). Accepted
  drafts are reported with exit k, the verified token with the last exit. Deviation: every row
  Each row drafts at most its tokens left - 1 and never past a drafted EOS
  (LayerSkip's rule; :func:`draft_caps`).
- ``confidence``: per row, the token leaves at the first exit whose confidence (the fused
  ``ann_kernels::early_exit_step`` op: C++ on CPU, CUDA on GPU) reaches the threshold; rows
  that continue carry their waiting positions through each segment (``recompute``: the cache
  ends equal to the full model's), or exiting rows write every later layer's K/V from their
  exit state at once (``propagate``, CALM: t5x ``contrib/calm`` state propagation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ann_kernels.generation.cache import additive_mask
from ann_kernels.generation.sampling import (
    RowSampling,
    choose_tokens,
    draw_uniform,
    filtered_probs,
    greedy_tokens,
    sample_from_probs,
    speculative_accept,
    token_logprobs,
)
from ann_kernels.ops.early_exit import criterion_code, step_function

_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["STEP_FUNCTIONS", "draft_caps", "step_full", "step_static", "step_self_speculative", "step_confidence"]


def _uniforms(st, n: int, k: int):
    return draw_uniform(n, k, st.generator, st.row_generators[:n], st.device)


def _subset(s: RowSampling, idx) -> RowSampling:
    return RowSampling(s.do_sample[idx], s.temperature[idx], s.top_k[idx], s.top_p[idx], s.any_sample, s.plain)


def _repeat(s: RowSampling, r: int) -> RowSampling:
    rep = lambda t: t.repeat_interleave(r)  # noqa: E731
    return RowSampling(rep(s.do_sample), rep(s.temperature), rep(s.top_k), rep(s.top_p), s.any_sample, s.plain)


def _last_token(st, n: int):
    """(positions p [n] host, p on the device, the rows' last tokens [n, 1]): the tokens the
    last one-token step appended when still valid (``DecodeState.next_input``), else read
    from the token buffer."""
    p = st.length[:n] - 1
    pd = p.to(st.device)
    cached = st.next_input
    if cached is not None and cached[0] == n:
        return p, pd, cached[1].unsqueeze(1)
    return p, pd, st.tokens[:n].gather(1, pd.unsqueeze(1))


def step_static(st, n: int, exit_id: int | None = None):
    """Every row's next token from exit ``exit_id`` (default: the config's exit_index)."""
    ad = st.adapter
    k = st.config.exit_index if exit_id is None else exit_id
    p, pd, x = _last_token(st, n)
    qpos = p.unsqueeze(1)
    layers = st.segment_layers(0, k)
    h = st.run_layers(layers, ad.embed(x, pd.unsqueeze(1)), qpos, qpos)
    logits = ad.exit_logits(h[:, 0], k)
    s = st.sampling(n)
    tok, logprob = choose_tokens(logits, s, _uniforms(st, n, 1)[:, 0] if s.any_sample else None)
    st.seg_len[:n, : k + 1] = st.length[:n].unsqueeze(1)
    st.counters.layer_evals += n * len(layers)
    st.counters.head_evals += n
    exits, counts = st.constant_exits(n, k)
    return tok, exits, counts, logprob


def step_full(st, n: int):
    """Every row's next token from the last exit (every layer)."""
    return step_static(st, n, st.num_exits - 1)


def draft_caps(st, n: int) -> Tensor:
    """Per-row draft limits [n] (host int64): a row with r tokens left drafts at most r - 1
    (a step yields its accepted drafts + 1 verified token), at most ``draft_len``; masked
    (finished) rows draft 0. LayerSkip's rule: ``self_speculation_generator.py``, ``generate``
    passes ``num_speculations=min(num_speculations, max_steps - len(output_ids) - 1)``."""
    left = st.max_new[:n] - st.generated[:n]
    caps = (left - 1).clamp(min=0, max=st.config.draft_len)
    return caps.masked_fill_(st.masked[:n], 0)


def candidate_head(st, exit_id: int):
    """(norm, weight rows, bias, token ids) of exit ``exit_id`` restricted to the state's
    candidate tokens, or None (no candidate set, an exit not of the form linear(norm(h)), or
    a set so large the whole head costs about the same)."""
    if st.candidates is None:
        return None
    parts = st.adapter.exit_head(exit_id)
    if parts is None:
        return None
    ids = st.candidates.nonzero().squeeze(1)
    if ids.numel() == 0 or 2 * ids.numel() > st.candidates.numel():
        return None
    norm, weight, bias = parts
    return norm, weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids), ids


def _draft_rows(caps_list: list[int], i: int, n: int):
    """The rows that run draft pass i: those with a cap >= i (they still need the exit state
    at position p + i: a draft to verify, or the last one's state for the bonus token), as
    (run list or None = all n rows, whether the run rows are the prefix 0 .. m - 1). Rows that
    stopped drafting ride along (their extra drafts are never accepted) unless skipping them
    is cheap: they are the last rows (the pass reads a prefix of the cache: views) or at least
    half of the batch (a gather of the rest's cache beats the wasted row passes)."""
    run = [r for r in range(n) if caps_list[r] >= i]
    m = len(run)
    if m == n:
        return None, True
    if run[-1] == m - 1:
        return run, True
    return (run, False) if 2 * m <= n else (None, True)


def step_self_speculative(st, n: int):
    """Draft up to ``draft_len`` tokens from exit ``exit_index``, verify, accept per row.

    The batch drafts while some row may still use a draft: up to its cap (:func:`draft_caps`)
    and not past a drafted EOS (its later drafts could never be kept; LayerSkip also stops a
    draft at EOS), nor, with ``draft_confidence`` set, past a draft whose probability under
    the draft exit is below it (Hugging Face's ``assistant_confidence_threshold``:
    ``generation/stopping_criteria.py``, ``ConfidenceCriteria``; greedy output unchanged).
    A draft pass runs the rows that still draft (:func:`_draft_rows`) and the draft head only
    the rows that draft a token in it; rows that stopped and ride along are never accepted
    past their own drafts (m <= the row's own draft count). One attention mask (ragged rows)
    serves every draft pass and the verify pass."""
    ad, cfg = st.adapter, st.config
    k, last = cfg.exit_index, st.num_exits - 1
    dev = st.device
    p, pd, x = _last_token(st, n)
    s = st.sampling(n)
    early, deep = st.segment_layers(0, k), st.segment_layers(k + 1, last)
    caps_list = draft_caps(st, n).tolist()
    d = max(caps_list)  # draft steps this round (shrinks when every row has stopped drafting)
    # a row's draws do not depend on the batch: always draft_len (+ 1) uniforms per row
    u_draft = _uniforms(st, n, cfg.draft_len) if s.any_sample else None
    check_eos = bool(st.eos.numel()) and d > 0
    stop_below = cfg.draft_confidence if d > 0 else None
    head = candidate_head(st, k) if not s.any_sample and d > 0 else None
    # 0. the positions p .. p + d of every row, and (rows at different positions) one mask for
    #    every pass: mask[r, 0, i, j] = key j visible from position p_r + i
    positions = p.unsqueeze(1) + st._arange_host[: d + 1].unsqueeze(0)  # host [n, d + 1]
    p_list = p.tolist()
    p_max = max(p_list)
    ragged = p_max != min(p_list)
    mask_all = additive_mask(st._arange_host[: p_max + d + 1].view(1, 1, 1, -1)
                             <= positions.view(n, 1, d + 1, 1), ad.dtype).to(dev)
    pos_d = positions.to(dev)
    drafts, qs, states = [], [], []
    ctr = st.counters
    # 1. draft with the early layers, one position per pass, keeping each position's exit state
    i, run, run_d, prefix = 0, None, None, True
    while True:
        qpos = positions[:, i:i + 1]
        window = p_max + i + 1
        if run is None:
            mask = mask_all[:, :, i:i + 1, :window] if ragged else None
            h = st.run_layers(early, ad.embed(x, pos_d[:, i:i + 1]), qpos, qpos, window=window, mask=mask)
            states.append(h)
        else:  # the rows that still draft; the others' states stay zero (never accepted)
            m_run = len(run)
            q_sel = qpos[:m_run] if prefix else qpos[torch.tensor(run)]
            mask = None
            if ragged:
                mask = (mask_all[:m_run] if prefix else mask_all[run_d])[:, :, i:i + 1, :window]
            h = st.run_layers(early, ad.embed(x, q_sel.to(dev)), q_sel, q_sel, window=window, mask=mask,
                              rows=None if prefix else run_d)
            full = h.new_zeros(n, 1, h.shape[-1])
            full[run_d] = h
            states.append(full)
        ctr.layer_evals += (n if run is None else len(run)) * len(early)
        if i == d:  # 2. the last position only needed its early layers (for the verify pass)
            break
        # the draft head: only rows that draft a token here (cap > i)
        ran = range(n) if run is None else run  # the rows of h, in order
        local = [j for j, r in enumerate(ran) if caps_list[r] > i]  # their places in h
        drafting = [ran[j] for j in local]
        h_head = h[torch.tensor(local, device=dev)] if len(local) < len(ran) else h
        ctr.head_evals += len(drafting)
        if head is not None:  # greedy: argmax over the candidate set (the verify keeps it exact)
            norm, w_c, b_c, ids = head
            logits = torch.nn.functional.linear(norm(h_head[:, 0]), w_c, b_c)
            local_tok = logits.argmax(dim=-1)
            tok = ids[local_tok]
        else:
            logits = ad.exit_logits(h_head[:, 0], k)
            tok = logits.argmax(dim=-1)
        all_rows = len(drafting) == n
        d_sel = None if all_rows else torch.tensor(drafting, device=dev)
        if s.any_sample:
            sub = s if all_rows else _subset(s, d_sel)
            q = filtered_probs(logits, sub)
            tok = torch.where(sub.do_sample, sample_from_probs(q, u_draft[:, i] if all_rows else u_draft[d_sel, i]), tok)
            if not all_rows:
                q = q.new_zeros(n, q.shape[-1]).index_copy_(0, d_sel, q)
            qs.append(q)
        if not all_rows:
            tok = torch.zeros(n, dtype=torch.int64, device=dev).index_copy_(0, d_sel, tok)
        drafts.append(tok)
        i += 1
        if check_eos or stop_below is not None:
            # a row that drafted EOS, or a token below the draft confidence, drafts no further
            # (the token itself stays a draft); the batch stops when no row drafts on
            t_rows = tok if all_rows else tok[d_sel]
            stop = torch.zeros(len(drafting), dtype=torch.bool, device=dev)
            if check_eos:
                stop |= torch.isin(t_rows, st.eos.to(dev))
            if stop_below is not None:  # the probability among the logits' own columns
                col = local_tok if head is not None else t_rows
                p_tok = torch.softmax(logits.float(), dim=-1).gather(1, col.unsqueeze(1)).squeeze(1)
                stop |= p_tok < stop_below
            for r, hit in zip(drafting, stop.tolist()):
                if hit:
                    caps_list[r] = min(caps_list[r], i)
            d = min(d, max(caps_list))
        run, prefix = _draft_rows(caps_list, i, n)
        if run is None:
            x = tok.unsqueeze(1)
        else:
            run_d = torch.tensor(run, device=dev)
            x = tok[run_d].unsqueeze(1)
    caps = torch.tensor(caps_list, dtype=torch.int64)
    # 3. the deep layers over the d + 1 positions p .. p + d from their exit states
    h_in = states[0] if d == 0 else torch.cat(states, dim=1)
    chunk = cfg.verify_chunk or (d + 1)
    outs = []
    for c0 in range(0, d + 1, chunk):
        c1 = min(c0 + chunk, d + 1)
        pc = positions[:, c0:c1]
        window = p_max + c1
        mask = mask_all[:, :, c0:c1, :window] if ragged or c1 - c0 > 1 else None
        outs.append(st.run_layers(deep, h_in[:, c0:c1], pc, pc, window=window, mask=mask))
    h_out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    logits = ad.exit_logits(h_out, last)  # [n, d + 1, V]
    # 4. accept per row: the longest agreeing prefix m (at most the row's own drafts), then one
    #    verified token
    draft = torch.stack(drafts, dim=1) if d else torch.empty(n, 0, dtype=torch.int64, device=dev)
    if s.any_sample:
        target = logits.argmax(dim=-1)
        target_lp = None
    else:  # greedy: the verified token and its log-probability from one max
        target, target_lp = greedy_tokens(logits)
    if st.candidates is not None:  # the verifier's top K at every position join the candidates
        st.candidates[logits.topk(min(cfg.draft_candidates, logits.shape[-1]), dim=-1).indices.reshape(-1)] = True
        st.candidates[target.reshape(-1)] = True
    caps_d = caps.to(dev)
    m = torch.minimum((draft == target[:, :d]).to(torch.int64).cumprod(dim=1).sum(dim=1), caps_d)
    out, pv = target, None
    if s.any_sample:
        vocab = logits.shape[-1]
        pv = filtered_probs(logits.reshape(n * (d + 1), vocab), _repeat(s, d + 1)).view(n, d + 1, vocab)
        q = torch.stack(qs, dim=1) if d else pv[:, :0]
        u = _uniforms(st, n, cfg.draft_len + 1)
        m_s, final = speculative_accept(draft, q, pv, u[:, :d], u[:, cfg.draft_len], limit=caps_d)
        sampled = torch.cat([draft, final.unsqueeze(1)], dim=1)
        sampled[:, -1] = 0
        sampled = sampled.scatter(1, m_s.unsqueeze(1), final.unsqueeze(1))
        m = torch.where(s.do_sample, m_s, m)
        out = torch.where(s.do_sample.unsqueeze(1), sampled, target)
    exits = torch.where(st._arange[: d + 1].unsqueeze(0) < m.unsqueeze(1), k, last)
    logprobs = token_logprobs(logits, out, s, pv) if target_lp is None else target_lp
    # 5. crop: every segment of the row now holds positions 0 .. p + m
    m_host = m.cpu()
    st.seg_len[:n] = (p + m_host + 1).unsqueeze(1)
    ctr.drafted += sum(caps_list)
    ctr.draft_steps += d
    ctr.accepted += int(m_host.sum())
    ctr.verify_rows += n
    ctr.layer_evals += n * (d + 1) * len(deep)
    ctr.head_evals += n * (d + 1)
    return out, exits, m_host + 1, logprobs


def step_confidence(st, n: int):
    """Each row's token from the first exit confident enough (see the module docstring)."""
    ad, cfg = st.adapter, st.config
    dev, last = st.device, st.num_exits - 1
    p, pd, x = _last_token(st, n)
    s = st.sampling(n)
    u = _uniforms(st, n, 1)[:, 0] if s.any_sample else None
    prediction = torch.empty(n, dtype=torch.int64, device=dev)
    exit_index = torch.empty(n, dtype=torch.int64, device=dev)
    confidence = torch.empty(n, dtype=torch.float32, device=dev)
    logprob = torch.empty(n, dtype=torch.float64, device=dev)
    decide = step_function(dev.type)
    code = criterion_code(cfg.criterion)
    propagate = cfg.kv_policy == "propagate"
    rows_host = st._arange_host[:n]
    rows_dev = st._arange[:n]
    subset = False  # rows_dev is the prefix 0..n-1 until a row exits
    h = ad.embed(x, pd.unsqueeze(1))
    ctr = st.counters
    for seg in range(st.num_exits):
        layers = st.segments[seg]
        cur = p[rows_host]
        start = st.seg_len[rows_host, seg]
        count = cur - start + 1
        m = rows_host.shape[0]
        rows_arg = rows_dev if subset else None
        width = int(count.max())
        if width == 1:
            qpos = cur.unsqueeze(1)
            h = st.run_layers(layers, h, qpos, qpos, rows=rows_arg)
        else:  # recompute: the row's waiting positions start .. cur - 1 ride along
            cur_d = cur.to(dev)
            st.hidden.index_put_((rows_dev, cur_d), h[:, 0])
            j = st._arange_host[:width].unsqueeze(0)
            valid = j < count.unsqueeze(1)
            pos = start.unsqueeze(1) + j
            qpos = torch.where(valid, pos, 0)
            write = torch.where(valid, pos, st.T)
            write_d = write.to(dev)
            h_in = st.hidden[rows_dev.unsqueeze(1), write_d]
            h_out = st.run_layers(layers, h_in, qpos, write, rows=rows_arg, window=int(cur.max()) + 1)
            st.hidden.index_put_((rows_dev.unsqueeze(1).expand(m, width), write_d), h_out)
            h = h_out[st._arange[:m], (count - 1).to(dev)].unsqueeze(1)
        st.seg_len[rows_host, seg] = cur + 1
        ctr.layer_evals += float(count.sum()) * len(layers)
        threshold = -math.inf if seg == last else cfg.thresholds[seg]
        if threshold == math.inf:  # nobody can leave here: skip the head
            continue
        raw_logits = logits = ad.exit_logits(h[:, 0], seg)
        ctr.head_evals += m
        if logits.dtype not in _OP_DTYPES:
            logits = logits.float()
        survivors, keep_local, _ = decide(logits, rows_dev, None, prediction, exit_index, confidence,
                                          float(threshold), code, seg, -1)
        if keep_local.shape[0] == m:
            continue
        leaving = torch.ones(m, dtype=torch.bool, device=dev)
        leaving[keep_local] = False
        leave_local = leaving.nonzero().squeeze(1)
        leave_rows = rows_dev[leave_local]
        leave_logits = raw_logits[leave_local]
        if s.any_sample:
            tok, logprob[leave_rows] = choose_tokens(leave_logits, _subset(s, leave_rows), u[leave_rows])
            prediction[leave_rows] = tok
        else:
            logprob[leave_rows] = token_logprobs(leave_logits, prediction[leave_rows]).to(logprob.dtype)
        if seg < last:
            h_leave = h[leave_local]
            if propagate:  # each skipped layer's K/V from the exit state (approximate)
                leave_host = leave_rows.cpu()
                pos_host = p[leave_host].unsqueeze(1)
                pos_d = pos_host.to(dev)
                later = st.segment_layers(seg + 1, last)
                rope = ad.rope(pos_d, h_leave)
                for i in later:
                    k_, v_ = ad.kv(i, h_leave, rope)
                    st.cache.write(i, pos_d, k_, v_, leave_rows)
                st.seg_len[leave_host, seg + 1:] = pos_host + 1
                ctr.layer_evals += leave_host.shape[0] * len(later) * ad.kv_flops_fraction
            else:  # keep the exit state: the row's next deeper token carries it on
                st.hidden.index_put_((leave_rows, pd[leave_rows]), h_leave[:, 0])
        if keep_local.shape[0] == 0:
            break
        rows_dev, subset = survivors, True
        rows_host = survivors.cpu()
        h = h[keep_local]
    return prediction, exit_index, torch.ones(n, dtype=torch.int64), logprob


STEP_FUNCTIONS = {"full": step_full, "static": step_static, "self_speculative": step_self_speculative,
                  "confidence": step_confidence}
