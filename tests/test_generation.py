"""The decoding engine against the cache-free oracle (ann_kernels/generation/reference.py):
full, static, self-speculative (greedy and sampled), EOS / max_new_tokens, rows joining and
leaving a running batch, bad input."""

from __future__ import annotations


import pytest
import torch

import ann_kernels
from ann_kernels.generation import DecodeState, ModeConfig, RowParams, as_adapter
from ann_kernels.generation.reference import exit_logits_reference, generate_reference
from tests.utils import ragged_prompts, tiny_causal_lm

V = 40


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(V)


@pytest.fixture(scope="module")
def prompts():
    return ragged_prompts(8, V)


@pytest.fixture(scope="module")
def full_out(model, prompts):
    return ann_kernels.generate(model, prompts, max_new_tokens=12)


def test_full_batch8_ragged_equals_oracle_and_each_row_alone(model, prompts, full_out):
    assert full_out.stats["mode"] == "full" and full_out.stats["layer_fraction"] == 1.0
    for p, toks, exits in zip(prompts, full_out.tokens, full_out.exit_index):
        assert toks == generate_reference(model, p, 12)[0]
        assert exits == [model.num_exits - 1] * 12
        assert ann_kernels.generate(model, [p], max_new_tokens=12).tokens[0] == toks
    assert len({tuple(t) for t in full_out.tokens}) > 4  # rows differ: the test can tell them apart


def test_tensor_prompts_with_attention_mask_left_padded(model, prompts, full_out):
    width = max(map(len, prompts))
    ids = torch.zeros(8, width, dtype=torch.long)
    mask = torch.zeros(8, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = ann_kernels.generate(model, ids, max_new_tokens=12, attention_mask=mask)
    assert out.tokens == full_out.tokens


@pytest.mark.parametrize("k", [0, 2])
def test_static_equals_exit_k_argmax(model, prompts, k):
    out = ann_kernels.generate(model, prompts, max_new_tokens=8, mode="static", exit_index=k)
    for p, toks, exits in zip(prompts, out.tokens, out.exit_index):
        assert toks == generate_reference(model, p, 8, mode="static", exit_index=k)[0]
        assert exits == [k] * 8
    assert out.stats["layer_fraction"] == pytest.approx((k + 1) / 4)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("draft_len", [1, 4, 8])
def test_self_speculative_greedy_equals_full(model, prompts, full_out, batch, draft_len):
    for k in range(model.num_exits - 1):
        out = ann_kernels.generate(model, prompts[:batch], max_new_tokens=12, mode="self_speculative",
                                   exit_index=k, draft_len=draft_len)
        assert out.tokens == full_out.tokens[:batch], (k, draft_len)
        st = out.stats
        assert 0 <= st["acceptance_rate"] <= 1 and 1 <= st["tokens_per_verify"] <= draft_len + 1
        for toks, exits in zip(out.tokens, out.exit_index):
            assert set(exits) <= {k, model.num_exits - 1} and len(exits) == len(toks)


def test_self_speculative_accepts_when_draft_is_the_model():
    # exit 0 after layer 2 of a 3-layer model whose last layer is zeroed: the draft equals
    # the verifier, so every draft is accepted (d + 1 tokens per verify)
    m = tiny_causal_lm(V, layers=3, exit_layers=[1])
    with torch.no_grad():
        for p in m.stages[1].blocks[0].parameters():
            p.zero_()
    out = ann_kernels.generate(m, ragged_prompts(4, V), max_new_tokens=10, mode="self_speculative",
                               exit_index=0, draft_len=4)
    assert out.stats["acceptance_rate"] == 1.0
    assert out.stats["tokens_per_verify"] == pytest.approx(10 / 2)  # 5 + 5 per row


def test_sequential_verify_cache_is_bit_exact_with_full():
    """verify_chunk=1 runs the deep layers with full's shapes: the cache (every layer) and the
    tokens equal full decoding's bit for bit, in float32, at batch 1."""
    m = tiny_causal_lm(V, dtype=torch.float32)
    ad = as_adapter(m)
    prompt = [3, 1, 4, 1, 5]
    caches = {}
    for name, cfg in (("full", ModeConfig("full")),
                      ("spec", ModeConfig("self_speculative", exit_index=1, draft_len=3, verify_chunk=1))):
        st = DecodeState(ad, cfg, max_batch_size=1, max_positions=30, eos_token_id=None)
        st.add_rows([prompt], [RowParams(max_new_tokens=25)], [0])
        while int(st.length[0]) < 20:
            st.step()
        n = 19  # positions 0..18 are in every layer's cache of both runs
        caches[name] = ([k[0, :, :n].clone() for k in st.cache.keys], st.tokens[0, :20].clone())
    assert torch.equal(caches["full"][1], caches["spec"][1])
    for a, b in zip(caches["full"][0], caches["spec"][0]):
        assert torch.equal(a, b)


def test_eos_and_max_new_tokens_per_row(model, prompts, full_out):
    eos = full_out.tokens[2][3]  # row 2 emits it at step 3 (maybe earlier in other rows)
    max_new = [12, 5, 12, 1, 12, 7, 12, 12]
    for mode, kw in (("full", {}), ("self_speculative", {"exit_index": 1, "draft_len": 4})):
        out = ann_kernels.generate(model, prompts, max_new_tokens=max_new, eos_token_id=eos, mode=mode, **kw)
        for i, p in enumerate(prompts):
            ref = generate_reference(model, p, max_new[i], eos_token_id=eos)[0]
            assert out.tokens[i] == ref, (mode, i)
        assert out.tokens[2][-1] == eos and len(out.tokens[2]) <= 4
        assert len(out.tokens[3]) == 1


def test_rows_join_and_leave_a_running_batch(model, prompts, full_out):
    ad = as_adapter(model)
    st = DecodeState(ad, ModeConfig("self_speculative", exit_index=0, draft_len=2), max_batch_size=4,
                     max_positions=24)
    got = {i: [] for i in range(5)}
    st.add_rows(prompts[:2], [RowParams(12), RowParams(12)], [0, 1])
    for _ in range(2):
        for ev in st.step():
            got[ev.row_id] += ev.tokens
    st.remove_rows([1])  # cancelled: its slot is freed for the others
    st.add_rows(prompts[2:5], [RowParams(12)] * 3, [2, 3, 4])  # join mid-generation
    assert st.num_rows == 4 and 1 not in st.row_ids
    while st.num_rows:
        for ev in st.step():
            got[ev.row_id] += ev.tokens
    for i in (0, 2, 3, 4):
        assert got[i] == full_out.tokens[i], i


def test_max_batch_size_queues_prompts(model, prompts, full_out):
    out = ann_kernels.generate(model, prompts, max_new_tokens=12, max_batch_size=3)
    assert out.tokens == full_out.tokens


def test_sampling_reproducible_with_a_seeded_generator(model, prompts):
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=10, top_p=0.9)
    a = ann_kernels.generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    b = ann_kernels.generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    c = ann_kernels.generate(model, prompts, generator=torch.Generator().manual_seed(4), **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    s = ann_kernels.generate(model, prompts, mode="self_speculative", exit_index=1,
                             generator=torch.Generator().manual_seed(3), **kw)
    s2 = ann_kernels.generate(model, prompts, mode="self_speculative", exit_index=1,
                              generator=torch.Generator().manual_seed(3), **kw)
    assert s.tokens == s2.tokens


def _chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    stat, dof, rest_obs, rest_exp = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        e = n * p
        if e < 5:
            rest_obs, rest_exp = rest_obs + counts.get(cell, 0), rest_exp + e
            continue
        stat += (counts.get(cell, 0) - e) ** 2 / e
        dof += 1
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        dof += 1
    return stat, dof


@pytest.mark.parametrize("mode", ["full", "self_speculative"])
def test_sampling_is_distributed_as_the_full_model(mode):
    """Pairs of tokens sampled from one prompt (4000 rows at once) against the full model's
    exact joint distribution (chi-square, p = 0.001): the rejection rule must not bias it."""
    vocab = 5
    m = tiny_causal_lm(vocab, dim=16, layers=3, head_scale=3.0, max_len=8, seed=1)
    prompt, n, temperature = [1, 3], 4000, 0.8
    kw = {"exit_index": 0, "draft_len": 3} if mode == "self_speculative" else {}
    out = ann_kernels.generate(m, [prompt] * n, max_new_tokens=2, do_sample=True, temperature=temperature,
                               generator=torch.Generator().manual_seed(0), mode=mode, **kw)
    counts: dict = {}
    for t in out.tokens:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    probs = {}
    p1 = torch.softmax(exit_logits_reference(m, prompt)[-1] / temperature, -1)
    for a in range(vocab):
        p2 = torch.softmax(exit_logits_reference(m, prompt + [a])[-1] / temperature, -1)
        for b in range(vocab):
            probs[(a, b)] = float(p1[a] * p2[b])
    stat, dof = _chi_square(counts, probs, n)
    critical = {d: c for d, c in [(20, 45.3), (21, 46.8), (22, 48.3), (23, 49.7), (24, 51.2)]}
    assert dof >= 20
    assert stat < critical[dof], (stat, dof)
    if mode == "self_speculative":
        assert 0 < out.stats["acceptance_rate"] < 1


@pytest.mark.parametrize("bad, message", [
    ({"prompts": [[1, 2], []]}, "prompts\\[1\\]: empty prompt"),
    ({"prompts": [[1, V]]}, f"prompts\\[0\\]: token id {V} is out of range"),
    ({"prompts": [[-1]]}, "prompts\\[0\\]: token id -1"),
    ({"max_new_tokens": 46}, "max_new_tokens: .*exceeds the model's max length 48"),
    ({"max_new_tokens": 0}, "max_new_tokens: expected ints >= 1"),
    ({"mode": "static", "exit_index": 4}, "exit_index: 4 is out of range \\[0, 3\\]"),
    ({"mode": "self_speculative", "exit_index": 3}, "exit_index: 3 is out of range \\[0, 2\\]"),
    ({"mode": "static"}, "exit_index: mode='static' needs"),
    ({"mode": "self_speculative", "exit_index": 0, "draft_len": 0}, "draft_len: expected an int >= 1"),
    ({"mode": "confidence"}, "threshold: mode='confidence' needs"),
    ({"mode": "confidence", "threshold": [0.5] * 5}, "threshold: expected one number or 3 / 4"),
    ({"mode": "beam"}, "mode: expected one of"),
    ({"criterion": "nope"}, "criterion: expected one of"),
    ({"kv_policy": "nope"}, "kv_policy: expected one of"),
    ({"do_sample": True, "temperature": 0.0}, "temperature: expected a finite number > 0"),
    ({"do_sample": True, "top_p": 0.0}, "top_p: expected a number in \\(0, 1\\]"),
    ({"eos_token_id": V}, "eos_token_id: expected ids in"),
    ({"prompts": []}, "prompts: expected at least one prompt"),
    ({"prompts": "hello"}, "prompts: expected a list of token-id lists"),
])
def test_bad_input_names_the_argument(model, bad, message):
    kw = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **bad}
    with pytest.raises(ValueError, match=message):
        ann_kernels.generate(model, **kw)


@pytest.mark.parametrize("mode", [ModeConfig("full"), ModeConfig("self_speculative", exit_index=1, draft_len=3)])
def test_row_with_its_own_generator_does_not_depend_on_the_batch(model, prompts, full_out, mode):
    """Per-row sampling parameters and generators (what a server gives each request): a
    seeded sampling row draws the same tokens alone and beside other rows; greedy rows in the
    same batch stay equal to full."""
    ad = as_adapter(model)

    def run(rows):
        st = DecodeState(ad, mode, max_batch_size=len(rows), max_positions=30)
        st.add_rows([prompts[i] for i in rows],
                    [RowParams(8, do_sample=True, temperature=0.7, top_k=12, top_p=0.95,
                               generator=torch.Generator().manual_seed(11)) if i == 0 else RowParams(8)
                     for i in rows], rows)
        got = {i: [] for i in rows}
        while st.num_rows:
            for ev in st.step():
                got[ev.row_id] += ev.tokens
        return got

    alone, mixed = run([0]), run([3, 0, 5])
    assert alone[0] == mixed[0] and len(alone[0]) == 8
    assert mixed[3] == full_out.tokens[3][:8] and mixed[5] == full_out.tokens[5][:8]


def test_decode_state_rejects_rows_that_do_not_fit(model):
    st = DecodeState(as_adapter(model), ModeConfig("full"), max_batch_size=2, max_positions=10)
    with pytest.raises(ValueError, match="max_new_tokens: prompts\\[0\\] has 4 tokens; 4 \\+ max_new_tokens 7"):
        st.add_rows([[1, 2, 3, 4]], [RowParams(7)], ["a"])
    with pytest.raises(ValueError, match="prompts\\[1\\]: empty prompt"):
        st.add_rows([[1], []], [RowParams(2)] * 2, ["a", "b"])
    st.add_rows([[1], [2]], [RowParams(2)] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="do not fit; 2 of 2 slots are in use"):
        st.add_rows([[3]], [RowParams(2)], ["c"])
