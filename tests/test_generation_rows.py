"""Rows near their end: self-speculative draft lengths capped by the tokens a row has left and
by a drafted EOS (forward work counted), and finished rows compacted or masked (the output
does not depend on the choice; the cost model's choice on synthetic costs)."""

from __future__ import annotations

import pytest
import torch

import ann_kernels
from ann_kernels.generation import DecodeState, ModeConfig, RowParams, as_adapter
from ann_kernels.generation.row_policy import RowCosts, measure_row_costs, prefer_masking
from tests.utils import ragged_prompts, tiny_causal_lm

V = 40


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(V)


@pytest.fixture(scope="module")
def prompts():
    return ragged_prompts(8, V)


@pytest.fixture(scope="module")
def exact_draft_model():
    """Exit 0 after layer 2 of 3, the last layer zeroed: every draft is accepted."""
    m = tiny_causal_lm(V, layers=3, exit_layers=[1])
    with torch.no_grad():
        for p in m.stages[1].blocks[0].parameters():
            p.zero_()
    return m


@pytest.mark.parametrize("max_new, draft_steps, verifies", [
    (6, 4, 2),   # 4 drafts -> 5 tokens; 1 left: no draft, one verified token
    (7, 5, 2),   # 4 drafts -> 5 tokens; 2 left: 1 draft
    (5, 4, 1),   # 4 drafts -> 5 tokens: done
    (3, 2, 1),   # 2 drafts -> 3 tokens in one verify
    (1, 0, 1),   # a one-token row never drafts
])
def test_draft_length_is_capped_by_the_tokens_left(exact_draft_model, max_new, draft_steps, verifies):
    prompt = [3, 1, 4, 1, 5]
    full = ann_kernels.generate(exact_draft_model, [prompt], max_new_tokens=max_new).tokens
    out = ann_kernels.generate(exact_draft_model, [prompt], max_new_tokens=max_new, mode="self_speculative",
                               exit_index=0, draft_len=4)
    assert out.tokens == full and len(full[0]) == max_new
    st = out.stats
    assert st["steps"] == verifies
    if draft_steps:  # capped drafts are all kept: none was wasted past the end
        assert st["acceptance_rate"] == 1.0
    else:
        assert st["acceptance_rate"] != st["acceptance_rate"]  # nothing drafted: NaN
    ad = as_adapter(exact_draft_model)
    state = DecodeState(ad, ModeConfig("self_speculative", exit_index=0, draft_len=4), max_batch_size=1,
                        max_positions=len(prompt) + max_new)
    state.add_rows([prompt], [RowParams(max_new)], [0])
    while state.num_rows:
        state.step()
    assert state.counters.draft_steps == draft_steps
    assert state.counters.drafted == draft_steps


def test_drafting_stops_at_a_drafted_eos(exact_draft_model):
    prompt = [3, 1, 4, 1, 5]
    full = ann_kernels.generate(exact_draft_model, [prompt], max_new_tokens=12).tokens[0]
    j = next(i for i in range(1, 12) if full[i] not in full[:i])  # EOS first drafted at index j
    eos = full[j]
    ad = as_adapter(exact_draft_model)
    state = DecodeState(ad, ModeConfig("self_speculative", exit_index=0, draft_len=8), max_batch_size=1,
                        max_positions=len(prompt) + 12, eos_token_id=eos)
    state.add_rows([prompt], [RowParams(12)], [0])
    got = []
    while state.num_rows:
        for ev in state.step():
            got += ev.tokens
    assert j < 8 and got == full[: j + 1]
    # drafts 0 .. j (the last one the EOS) and no further (the cap allowed 8), in one verify
    assert state.counters.draft_steps == j + 1 and state.counters.steps == 1


def test_batch_drafts_while_some_row_can_use_a_draft(exact_draft_model):
    """A row ending mid-draft stops drafting (its cap); the batch drafts up to the largest
    cap, and each row's output still equals full's."""
    ps = ragged_prompts(3, V, min_len=2, max_len=6, seed=3)
    max_new = [2, 9, 4]
    full = ann_kernels.generate(exact_draft_model, ps, max_new_tokens=max_new).tokens
    ad = as_adapter(exact_draft_model)
    state = DecodeState(ad, ModeConfig("self_speculative", exit_index=0, draft_len=4, finished_rows="mask"),
                        max_batch_size=3, max_positions=20)
    state.add_rows(ps, [RowParams(m) for m in max_new], [0, 1, 2])
    got = {i: [] for i in range(3)}
    while state.num_rows:
        for ev in state.step():
            got[ev.row_id] += ev.tokens
    assert [got[i] for i in range(3)] == full
    # step 1: caps 1, 4, 3 -> 4 passes, rows 0 and 2 done; step 2: row 1 has 4 left -> 3 passes
    assert state.counters.draft_steps == 4 + 3
    assert state.counters.drafted == (1 + 4 + 3) + 3


@pytest.mark.parametrize("max_new, early_rows, head_rows", [
    ([9, 2, 2, 2], [4, 4, 1, 1, 1], [4, 1, 1, 1]),  # the row still drafting is slot 0: a prefix (views)
    ([2, 2, 2, 9], [4, 4, 1, 1, 1], [4, 1, 1, 1]),  # slot 3 alone: gathered
    ([9, 2, 9, 2], [4, 4, 2, 2, 2], [4, 2, 2, 2]),  # half the rows: gathered
    ([2, 9, 9, 9], [4, 4, 4, 4, 4], [4, 3, 3, 3]),  # 3 of 4 scattered: the stopped row rides along
])
def test_rows_that_stopped_drafting_are_skipped(exact_draft_model, max_new, early_rows, head_rows):
    """Draft passes run only the rows that still draft (when that is a prefix or at most
    half the batch), the draft head only the rows that draft a token; output and
    log-probabilities stay equal to full's, and a sampling row with its own generator draws
    the same tokens whether the rows beside it ride along or are skipped."""
    ps = ragged_prompts(4, V, min_len=2, max_len=6, seed=4)
    full = ann_kernels.generate(exact_draft_model, ps, max_new_tokens=max_new)
    ad = as_adapter(exact_draft_model)

    def run(rows, sample_row=None):
        state = DecodeState(ad, ModeConfig("self_speculative", exit_index=0, draft_len=4, finished_rows="mask"),
                            max_batch_size=len(rows), max_positions=20)
        params = [RowParams(max_new[i], do_sample=True, temperature=0.9,
                            generator=torch.Generator().manual_seed(2)) if i == sample_row else RowParams(max_new[i])
                  for i in rows]
        state.add_rows([ps[i] for i in rows], params, rows)
        got = {i: ([], []) for i in rows}
        first = True
        while state.num_rows:
            for ev in state.step():
                got[ev.row_id][0].extend(ev.tokens)
                got[ev.row_id][1].extend(ev.logprobs)
            if first and len(rows) == 4:  # step 1: early layers (2) per run row per pass, the deep
                # layer and the verify head over 4 x 5 positions, a draft head per drafting row
                assert state.counters.layer_evals == 2 * sum(early_rows) + 4 * 5
                assert state.counters.head_evals == sum(head_rows) + 4 * 5
            first = False
        return got

    got = run([0, 1, 2, 3])
    assert [got[i][0] for i in range(4)] == full.tokens
    for i in range(4):
        assert got[i][1] == pytest.approx(full.logprobs[i], abs=1e-9)
    long_row = max(range(4), key=lambda i: max_new[i])
    mixed = run([0, 1, 2, 3], sample_row=long_row)
    alone = run([long_row], sample_row=long_row)
    assert mixed[long_row] == alone[long_row] and len(alone[long_row][0]) == 9


MODES = [("full", {}), ("static", {"exit_index": 1}), ("self_speculative", {"exit_index": 1, "draft_len": 3}),
         ("confidence", {"threshold": 0.8, "kv_policy": "recompute"}),
         ("confidence", {"threshold": 0.8, "kv_policy": "propagate"})]


@pytest.mark.parametrize("mode, kw", MODES)
def test_output_is_the_same_compacted_or_masked(model, prompts, mode, kw):
    max_new = [3, 10, 1, 7, 10, 2, 5, 10]  # rows finish at different steps, in the middle slots
    eos = 7
    outs = {fr: ann_kernels.generate(model, prompts, max_new_tokens=max_new, mode=mode, eos_token_id=eos,
                                     finished_rows=fr, **kw) for fr in ("compact", "mask", "auto")}
    assert outs["compact"].tokens == outs["mask"].tokens == outs["auto"].tokens
    assert outs["compact"].exit_index == outs["mask"].exit_index
    assert outs["mask"].stats["masked_steps"] > 0 and outs["mask"].stats["compactions"] == 1  # the end
    assert outs["compact"].stats["masked_steps"] == 0 and outs["compact"].stats["compactions"] > 1


def test_masked_rows_free_their_slots_for_joining_rows(model, prompts):
    """Rows joining a batch with masked rows: the masked rows are compacted away first; a
    sampling row with its own generator draws the same tokens as alone."""
    ad = as_adapter(model)
    full = ann_kernels.generate(model, prompts, max_new_tokens=9).tokens
    st = DecodeState(ad, ModeConfig("full", finished_rows="mask"), max_batch_size=4, max_positions=20)
    st.add_rows(prompts[:4], [RowParams(m) for m in (2, 9, 2, 9)], [0, 1, 2, 3])
    got = {i: [] for i in range(6)}
    for _ in range(2):
        for ev in st.step():
            got[ev.row_id] += ev.tokens
    assert st.num_rows == 2 and st.width == 4 and st.row_ids == [1, 3]
    st.add_rows(prompts[4:6], [RowParams(9)] * 2, [4, 5])
    assert st.width == 4 and sorted(st.row_ids) == [1, 3, 4, 5]
    while st.num_rows:
        for ev in st.step():
            got[ev.row_id] += ev.tokens
    for i in range(6):
        assert got[i] == full[i][: len(got[i])] and len(got[i]) == (2 if i in (0, 2) else 9)


COSTS = RowCosts(row_layer_s=1e-4, row_head_s=2e-4, copy_fixed_s=5e-4, copy_row_s=2e-4)


def test_cost_model_masks_few_rows_near_the_end_and_compacts_otherwise():
    # a row-step costs 6 x 0.1 + 0.2 = 0.8 ms; compacting k movers 0.5 + 0.2 k ms
    kw = dict(layers_per_row_step=6.0, heads_per_row_step=1.0)
    assert prefer_masking(COSTS, dead_rows=1, movers=1, remaining_steps=0.5, **kw)       # 0.4 < 0.7 ms
    assert not prefer_masking(COSTS, dead_rows=1, movers=1, remaining_steps=30, **kw)    # 24 ms > 0.7 ms
    assert not prefer_masking(COSTS, dead_rows=6, movers=2, remaining_steps=2, **kw)     # 9.6 ms > 0.9 ms
    assert not prefer_masking(COSTS, dead_rows=1, movers=0, remaining_steps=0.1, **kw)   # a truncation is free
    assert prefer_masking(COSTS, dead_rows=2, movers=4, remaining_steps=1, heads_per_row_step=0.0,
                          layers_per_row_step=2.0)                                       # 0.4 < 1.3 ms


def test_auto_follows_the_cost_model_in_the_decode_state(model, prompts):
    """The state's per-step choice with a synthetic cost table: cheap copies -> compaction;
    copies dearer than any remaining compute -> masking. Same tokens either way."""
    ad = as_adapter(model)
    max_new = [2, 8, 8, 8]
    results = {}
    for name, costs in (("cheap_copy", RowCosts(1e-3, 1e-3, 0.0, 1e-9)), ("dear_copy", RowCosts(1e-9, 1e-9, 1.0, 1.0))):
        st = DecodeState(ad, ModeConfig("full"), max_batch_size=4, max_positions=20)
        st.row_costs = costs
        st.add_rows(prompts[:4], [RowParams(m) for m in max_new], [0, 1, 2, 3])
        got = {i: [] for i in range(4)}
        while st.num_rows:
            for ev in st.step():
                got[ev.row_id] += ev.tokens
        results[name] = (got, st.counters.masked_steps, st.counters.compactions)
    assert results["cheap_copy"][0] == results["dear_copy"][0]
    assert results["cheap_copy"][1:] == (0, 2)  # row 0 compacted after step 2, the rest at the end
    assert results["dear_copy"][1:] == (6, 1)   # row 0 masked for the last 6 steps


def test_measured_costs_are_cached_per_model_and_leave_the_cache_alone(model, prompts):
    ad = as_adapter(model)
    st = DecodeState(ad, ModeConfig("full"), max_batch_size=3, max_positions=20)
    st.add_rows(prompts[:3], [RowParams(5)] * 3, [0, 1, 2])
    before = [k.clone() for k in st.cache.keys]
    costs = measure_row_costs(st, reps=2)
    assert all(v >= 0 for v in (costs.row_layer_s, costs.row_head_s, costs.copy_fixed_s, costs.copy_row_s))
    assert costs.row_layer_s + costs.row_head_s + costs.copy_row_s + costs.copy_fixed_s > 0
    for a, b in zip(before, st.cache.keys):  # only the scratch column T was written
        assert torch.equal(a[:, :, : st.T], b[:, :, : st.T])
    again = DecodeState(as_adapter(model), ModeConfig("static", exit_index=1), max_batch_size=3, max_positions=20)
    assert measure_row_costs(again) is costs  # same model and cache shape: measured once


def test_bad_finished_rows(model):
    with pytest.raises(ValueError, match="finished_rows: expected one of \\['auto', 'compact', 'mask'\\], got 'drop'"):
        ann_kernels.generate(model, [[1, 2]], max_new_tokens=2, finished_rows="drop")


@pytest.mark.parametrize("batch", [1, 8])
def test_draft_confidence_stops_drafts_and_keeps_the_output(model, prompts, batch):
    """A row stops drafting after a draft token below ``draft_confidence`` (Hugging Face's
    assistant_confidence_threshold): 1.0 stops after every first draft, 0.0 never; greedy
    output equals full's either way."""
    full = ann_kernels.generate(model, prompts[:batch], max_new_tokens=10).tokens
    runs = {}
    for c in (None, 0.0, 1.0):
        out = ann_kernels.generate(model, prompts[:batch], max_new_tokens=10, mode="self_speculative", exit_index=1,
                                   draft_len=4, draft_confidence=c)
        assert out.tokens == full, c
        runs[c] = out.stats
    assert runs[0.0]["steps"] == runs[None]["steps"] and runs[0.0]["acceptance_rate"] == runs[None]["acceptance_rate"]
    assert runs[1.0]["tokens_per_verify"] <= 2.0  # one draft + the verified token at most
    if batch == 1:
        assert runs[None]["tokens_per_verify"] > 2.0  # (so the test can tell)
    with pytest.raises(ValueError, match="draft_confidence: expected None or a number in \\[0, 1\\], got 1.5"):
        ann_kernels.generate(model, [[1, 2]], max_new_tokens=2, mode="self_speculative", exit_index=1,
                             draft_confidence=1.5)


def test_candidate_draft_head_keeps_the_output():
    """Greedy drafts over the cached candidate set (prompt and generated tokens plus the
    verifier's top K): the whole-vocabulary draft head is not evaluated, the output equals
    full's, and the set holds the prompts' tokens and every verified token."""
    vocab = 400
    m = tiny_causal_lm(vocab, layers=3)
    ps = ragged_prompts(3, vocab, seed=5)
    full = ann_kernels.generate(m, ps, max_new_tokens=10).tokens
    ad = as_adapter(m)
    st = DecodeState(ad, ModeConfig("self_speculative", exit_index=1, draft_len=3, draft_candidates=1),
                     max_batch_size=3, max_positions=20)
    st.add_rows(ps, [RowParams(10)] * 3, list(range(3)))
    assert set(st.candidates.nonzero().squeeze(1).tolist()) == {t for p in ps for t in p}
    whole_head_drafts = []
    exit_logits = ad.exit_logits
    ad.exit_logits = lambda h, e: (whole_head_drafts.append(e) if e == 1 else None) or exit_logits(h, e)
    got = {i: [] for i in range(3)}
    while st.num_rows:
        for ev in st.step():
            got[ev.row_id] += ev.tokens
    assert [got[i] for i in range(3)] == full
    assert whole_head_drafts == [] and st.counters.draft_steps > 0
    in_set = set(st.candidates.nonzero().squeeze(1).tolist())
    assert {t for row in full for t in row} <= in_set and len(in_set) <= vocab // 2
    with pytest.raises(ValueError, match="draft_candidates: expected an int >= 0"):
        ann_kernels.generate(m, [[1, 2]], max_new_tokens=2, mode="self_speculative", exit_index=1,
                             draft_candidates=-1)


@pytest.mark.parametrize("mode", [ModeConfig("full"), ModeConfig("self_speculative", exit_index=1, draft_len=3)])
def test_sampled_rows_with_own_generators_are_the_same_compacted_or_masked(model, prompts, mode):
    ad = as_adapter(model)
    got = {}
    for policy in ("compact", "mask"):
        cfg = ModeConfig(mode.mode, exit_index=mode.exit_index, draft_len=mode.draft_len, finished_rows=policy)
        st = DecodeState(ad, cfg, max_batch_size=6, max_positions=20)
        st.add_rows(prompts[:6], [RowParams(m, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(i))
                                  for i, m in enumerate((2, 9, 4, 9, 1, 6))], list(range(6)))
        out = {i: [] for i in range(6)}
        while st.num_rows:
            for ev in st.step():
                out[ev.row_id] += ev.tokens
        got[policy] = (out, st.counters.masked_steps)
    assert got["compact"][0] == got["mask"][0]
    assert got["compact"][1] == 0 < got["mask"][1]
