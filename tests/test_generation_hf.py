"""The engine on a Hugging Face ``LlamaForCausalLM`` (tiny random config, no download, fp32):
``full`` and greedy ``self_speculative`` equal HF's own ``generate(do_sample=False)`` token for
token at batch 1 and 8 (HF left-padded); static and confidence exits against HF's hidden states."""

from __future__ import annotations

import pytest
import torch

import ann_kernels
from ann_kernels.ops.early_exit import exit_confidence_reference
from tests.utils import ragged_prompts

transformers = pytest.importorskip("transformers", reason="transformers (extra [hf]) is not installed")

V, NEW = 64, 10
EXIT_LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompts():
    return ragged_prompts(8, V, min_len=1, max_len=7, seed=3)


@pytest.fixture(scope="module")
def hf_tokens(llama, prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = llama.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    batch8 = out[:, width:].tolist()
    with torch.no_grad():
        one = llama.generate(torch.tensor([prompts[1]]), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    return batch8, one[0, len(prompts[1]):].tolist()


def test_full_equals_hf_generate_batch_1_and_8(llama, prompts, hf_tokens):
    batch8, one = hf_tokens
    assert ann_kernels.generate(llama, prompts, max_new_tokens=NEW, exit_layers=EXIT_LAYERS).tokens == batch8
    assert ann_kernels.generate(llama, [prompts[1]], max_new_tokens=NEW, exit_layers=EXIT_LAYERS).tokens == [one]


@pytest.mark.parametrize("exit_index", [0, 1, 2])
def test_self_speculative_equals_hf_generate_batch_1_and_8(llama, prompts, hf_tokens, exit_index):
    batch8, one = hf_tokens
    kw = dict(max_new_tokens=NEW, exit_layers=EXIT_LAYERS, mode="self_speculative", exit_index=exit_index,
              draft_len=3)
    out = ann_kernels.generate(llama, prompts, **kw)
    assert out.tokens == batch8
    assert ann_kernels.generate(llama, [prompts[1]], **kw).tokens == [one]
    assert out.stats["tokens_per_verify"] >= 1


def _hf_exit_logits(llama, tokens):
    """Exit k's logits at the last position from HF's own forward: lm_head(norm(hidden after
    layer e_k)); HF's last hidden state already has the final norm."""
    with torch.no_grad():
        out = llama(torch.tensor([tokens]), output_hidden_states=True)
    hs = out.hidden_states
    logits = [llama.lm_head(llama.model.norm(hs[e + 1][0, -1])) for e in EXIT_LAYERS]
    return logits + [out.logits[0, -1]]


def test_static_and_confidence_against_hf_hidden_states(llama, prompts):
    static = ann_kernels.generate(llama, prompts[:3], max_new_tokens=5, exit_layers=EXIT_LAYERS, mode="static",
                                  exit_index=1)
    conf = ann_kernels.generate(llama, prompts[:3], max_new_tokens=5, exit_layers=EXIT_LAYERS, mode="confidence",
                                threshold=0.05)
    for i, p in enumerate(prompts[:3]):
        toks_s, toks_c, exits_c = list(p), [], []
        for _ in range(5):
            toks_s.append(int(_hf_exit_logits(llama, toks_s)[1].argmax()))
            logits = _hf_exit_logits(llama, p + toks_c)
            k = next(j for j in range(4) if j == 3 or bool(exit_confidence_reference(logits[j][None])[0][0] >= 0.05))
            toks_c.append(int(logits[k].argmax()))
            exits_c.append(k)
        assert static.tokens[i] == toks_s[len(p):]
        assert (conf.tokens[i], conf.exit_index[i]) == (toks_c, exits_c)
    prop = ann_kernels.generate(llama, prompts, max_new_tokens=5, exit_layers=EXIT_LAYERS, mode="confidence",
                                threshold=0.05, kv_policy="propagate")
    assert all(len(t) == 5 for t in prop.tokens)


def test_exit_layers_out_of_range(llama):
    with pytest.raises(ValueError, match="exit_layers: expected layer indices in \\[0, 4\\)"):
        ann_kernels.generate(llama, [[1, 2]], max_new_tokens=2, exit_layers=[5])


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_filtered_probs_match_hf_logits_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from ann_kernels.generation.sampling import RowSampling, filtered_probs

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    z = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        z = TopKLogitsWarper(top_k)(None, z)
    if top_p < 1:
        z = TopPLogitsWarper(top_p)(None, z)
    expected = torch.softmax(z, -1)
    n = logits.shape[0]
    s = RowSampling(torch.ones(n, dtype=torch.bool), torch.full((n,), temperature), torch.full((n,), top_k),
                    torch.full((n,), top_p), True, top_k == 0 and top_p == 1.0)
    torch.testing.assert_close(filtered_probs(logits, s), expected, atol=1e-6, rtol=1e-5)


def test_adapter_layers_match_hf_hidden_states_on_a_sharp_model():
    """The adapter's own layer math (fused q/k/v and gate/up, RoPE on q and k at once, RMSNorm)
    against HF's forward at every layer, on weights large enough that attention is far from
    uniform and positions matter (the default 0.02 init hides RoPE errors from token tests)."""
    from ann_kernels.generation import as_adapter

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    sharp = transformers.LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    ad = as_adapter(sharp, [0, 1])
    with torch.no_grad():
        hs = sharp(tokens, output_hidden_states=True).hidden_states
        pos = torch.arange(9).expand(2, 9)
        h = ad.embed(tokens, pos)
        rope = ad.rope(pos, h)
        for i in range(3):
            q, k, v = ad.qkv(i, h, rope)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ad.scaling,
                                                                 enable_gqa=True)
            h = ad.finish_layer(i, h, a.transpose(1, 2).reshape(2, 9, -1))
            if i < 2:  # HF's last hidden state already has the final norm: checked through the logits
                torch.testing.assert_close(h, hs[i + 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ad.exit_logits(h, i), sharp.lm_head(sharp.model.norm(h)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ad.exit_logits(h, 2), sharp.lm_head(hs[3]), atol=1e-4, rtol=1e-5)
