"""Per-token log-probabilities (``out.logprobs``, ``StepEvent.logprobs``) against the
cache-free oracle (``reference.token_logprobs_reference``: one whole-row forward, the
log-probability at the exit that produced each token, sampling filters written out apart
from the engine's): every mode, greedy and sampled, batch 1 and 8, ragged prompts."""

from __future__ import annotations

import math

import pytest
import torch

import ann_kernels
from ann_kernels.generation import DecodeState, ModeConfig, RowParams, as_adapter
from ann_kernels.generation.reference import token_logprobs_reference
from tests.utils import ragged_prompts, tiny_causal_lm

V = 40
MODES = [("full", {}), ("static", {"exit_index": 1}), ("confidence", {"threshold": 0.12}),
         ("self_speculative", {"exit_index": 0, "draft_len": 3}), ("self_speculative", {"exit_index": 2})]
SAMPLING = {"temperature": 0.8, "top_k": 12, "top_p": 0.9}


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(V)


@pytest.fixture(scope="module")
def prompts():
    return ragged_prompts(8, V)


def _check_against_oracle(model, prompts, out, mode, sampling):
    last = model.num_exits - 1
    for p, toks, exits, lps in zip(prompts, out.tokens, out.exit_index, out.logprobs):
        assert len(lps) == len(toks) > 0
        producing = [last] * len(toks) if mode == "self_speculative" else exits
        ref = token_logprobs_reference(model, p, toks, producing, do_sample=bool(sampling), **sampling)
        assert all(math.isfinite(x) and x <= 0 for x in ref)  # a sampled token lies inside its filtered set
        assert lps == pytest.approx(ref, abs=2e-6, rel=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("mode, kw", MODES, ids=[f"{m}-{list(k.values())}" for m, k in MODES])
def test_logprobs_equal_the_oracle(model, prompts, mode, kw, do_sample, batch):
    sampling = SAMPLING if do_sample else {}
    out = ann_kernels.generate(model, prompts[:batch], max_new_tokens=9, mode=mode, do_sample=do_sample,
                               generator=torch.Generator().manual_seed(5), **sampling, **kw)
    if mode == "confidence" and batch == 8:  # the threshold spreads the tokens over the exits
        assert len({e for row in out.exit_index for e in row}) >= 3
    _check_against_oracle(model, prompts[:batch], out, mode, sampling)


def test_self_speculative_greedy_logprobs_equal_full(model, prompts):
    full = ann_kernels.generate(model, prompts, max_new_tokens=10)
    for k in range(model.num_exits - 1):
        spec = ann_kernels.generate(model, prompts, max_new_tokens=10, mode="self_speculative", exit_index=k)
        assert spec.tokens == full.tokens
        for a, b in zip(spec.logprobs, full.logprobs):
            assert a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("mode", ["full", "self_speculative", "confidence"])
def test_step_events_carry_logprobs_with_eos_masked_rows_and_mixed_sampling(model, prompts, mode):
    """DecodeState.step's events (what the server reads): a sampling row with its own
    generator beside greedy rows, an EOS, different max_new_tokens, finished rows masked."""
    cfg = {"full": ModeConfig("full", finished_rows="mask"),
           "self_speculative": ModeConfig("self_speculative", exit_index=1, draft_len=4, finished_rows="mask"),
           "confidence": ModeConfig("confidence", thresholds=(0.12, 0.12, 0.12, -math.inf), finished_rows="mask")}[mode]
    eos = ann_kernels.generate(model, [prompts[2]], max_new_tokens=4).tokens[0][2]
    st = DecodeState(as_adapter(model), cfg, max_batch_size=4, max_positions=24, eos_token_id=eos)
    rows = [0, 2, 5, 7]
    params = [RowParams(10, do_sample=True, **SAMPLING, generator=torch.Generator().manual_seed(1)),
              RowParams(10), RowParams(3), RowParams(8)]
    st.add_rows([prompts[i] for i in rows], params, rows)
    got = {i: ([], [], []) for i in rows}
    while st.num_rows:
        for ev in st.step():
            assert len(ev.logprobs) == len(ev.tokens) == len(ev.exits)
            for acc, new in zip(got[ev.row_id], (ev.tokens, ev.exits, ev.logprobs)):
                acc.extend(new)
    assert len(got[5][0]) == 3 and got[2][0][-1] == eos
    last = model.num_exits - 1
    for i, rp in zip(rows, params):
        toks, exits, lps = got[i]
        producing = [last] * len(toks) if mode == "self_speculative" else exits
        sampling = SAMPLING if rp.do_sample else {}
        ref = token_logprobs_reference(model, prompts[i], toks, producing, do_sample=rp.do_sample, **sampling)
        assert lps == pytest.approx(ref, abs=2e-6, rel=1e-5), i


def test_logprobs_of_a_float32_model_are_float_close():
    m = tiny_causal_lm(V, dtype=torch.float32, seed=3)
    p = ragged_prompts(3, V, seed=2)
    out = ann_kernels.generate(m, p, max_new_tokens=6, mode="self_speculative", exit_index=1)
    for prompt, toks, lps in zip(p, out.tokens, out.logprobs):
        ref = token_logprobs_reference(m, prompt, toks, [m.num_exits - 1] * len(toks))
        assert lps == pytest.approx(ref, abs=1e-4)
