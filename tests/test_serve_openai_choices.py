"""``/v1/completions`` answers with several choices (``n``) and with ``logprobs`` over a
``GenerationServer``, driven with the real ``openai`` client over loopback: list prompts x n in
OpenAI's ``index`` order, greedy choices equal ``ann_kernels.generate`` and each other, seeded
sampled choices j equal ``generate`` with seed + j, streamed choices equal the non-streamed
ones, usage counts a prompt once; ``logprobs: 0`` values equal ``generate(...).logprobs``
(greedy in three modes, seeded sampling), streamed pieces concatenate to the non-streamed
object, ``logprobs >= 1`` is refused with 400."""

from __future__ import annotations

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install .[test])")
pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install .[serve])")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install .[serve])")

import ann_kernels  # noqa: E402
from ann_kernels.generation import GenerationServer  # noqa: E402
from ann_kernels.serve import create_app  # noqa: E402
from ann_kernels.serve.runner import HttpFront  # noqa: E402
from tests.utils import CharTokenizer, tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 0
NAME = "tiny"
TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(TOK.vocab_size, max_len=48, seed=3)


@pytest.fixture(scope="module")
def client(model):
    server = GenerationServer(model, TOK, max_batch_size=8, max_wait_s=0.01, eos_token_id=EOS)
    front = HttpFront(create_app(server, model_name=NAME)).start()
    yield openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)
    front.close()
    server.close()


def generated(model, prompt, max_tokens, **kw):
    """(text, tokens) of ``generate`` on the prompt alone."""
    out = ann_kernels.generate(model, [TOK.encode(prompt)], max_new_tokens=max_tokens, eos_token_id=EOS, **kw)
    return TOK.decode([t for t in out.tokens[0] if t != EOS]), out.tokens[0]


def test_greedy_choices_of_list_prompts_in_openai_index_order(client, model):
    prompts = ["the cat", "a dog ran"]
    out = client.completions.create(model=NAME, prompt=prompts, n=3, max_tokens=9, temperature=0)
    assert [c.index for c in out.choices] == list(range(6))
    refs = [generated(model, p, 9) for p in prompts]
    for c in out.choices:
        assert c.text == refs[c.index // 3][0], c.index  # prompt i's choices: i * n .. i * n + n - 1
    assert out.usage.prompt_tokens == sum(len(p) for p in prompts)  # once per prompt, not per choice
    assert out.usage.completion_tokens == 3 * sum(len(r[1]) for r in refs)


def test_seeded_choices_use_derived_seeds_and_repeat(client, model):
    args = dict(model=NAME, prompt="roll", max_tokens=10, temperature=1.0, seed=7)
    first = [c.text for c in client.completions.create(n=3, **args).choices]
    again = [c.text for c in client.completions.create(n=3, **args).choices]
    assert first == again
    refs = [generated(model, "roll", 10, do_sample=True, generator=torch.Generator().manual_seed(7 + j))[0]
            for j in range(3)]
    assert first == refs
    assert len(set(first)) > 1  # the seeds differ, so (for this model and seed) the samples do
    assert client.completions.create(n=1, **args).choices[0].text == first[0]


def test_streamed_choices_equal_the_completion(client, model):
    texts, finish = {}, {}
    for chunk in client.completions.create(model=NAME, prompt=["ab", "zz top"], n=2, max_tokens=8, temperature=1.0,
                                           seed=5, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
        usage = chunk.usage
    whole = client.completions.create(model=NAME, prompt=["ab", "zz top"], n=2, max_tokens=8, temperature=1.0, seed=5)
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert sorted(finish) == [0, 1, 2, 3]
    assert usage.prompt_tokens == len("ab") + len("zz top") == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def logprobs_reference(model, prompt, max_tokens, **kw):
    out = ann_kernels.generate(model, [TOK.encode(prompt)], max_new_tokens=max_tokens, eos_token_id=EOS, **kw)
    return out.tokens[0], out.logprobs[0]


MODES = [{}, {"mode": "self_speculative", "exit_index": 1, "draft_len": 3}, {"mode": "confidence", "threshold": 0.4}]


@pytest.mark.parametrize("mode", MODES, ids=["full", "self_speculative", "confidence"])
def test_logprobs_equal_generate(client, model, mode):
    out = client.completions.create(model=NAME, prompt=["the cat", "zz"], n=2, max_tokens=10, temperature=0,
                                    logprobs=0, extra_body={"early_exit": mode} if mode else None)
    for c in out.choices:
        prompt = ["the cat", "zz"][c.index // 2]
        tokens, logprobs = logprobs_reference(model, prompt, 10, **mode)
        lp = c.logprobs
        assert lp.token_logprobs == pytest.approx(logprobs, rel=1e-9, abs=1e-12) and max(logprobs) <= 0
        assert lp.tokens == [TOK.decode([t]) for t in tokens]  # EOS included, as ""
        assert "".join(lp.tokens) == c.text  # no stop string: the texts add up to the choice's text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(tokens))]
        assert lp.top_logprobs is None
    assert max(len(c.logprobs.tokens) for c in out.choices) >= 5
    plain = client.completions.create(model=NAME, prompt="zz", max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None  # only when asked


def test_streamed_sampled_logprobs_concatenate_to_the_completion(client, model):
    args = dict(model=NAME, prompt="roll", max_tokens=12, temperature=0.8, top_p=0.9, seed=4, logprobs=0)
    pieces = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            for key in pieces:
                pieces[key] += getattr(c.logprobs, key)
    whole = client.completions.create(**args).choices[0].logprobs
    assert pieces == {"tokens": whole.tokens, "token_logprobs": whole.token_logprobs,
                      "text_offset": whole.text_offset}
    tokens, logprobs = logprobs_reference(model, "roll", 12, do_sample=True, temperature=0.8, top_p=0.9,
                                          generator=torch.Generator().manual_seed(4))
    assert len(tokens) == 12 and len(set(logprobs)) > 1  # (this seed gives no early EOS)
    assert whole.tokens == [TOK.decode([t]) for t in tokens]
    assert whole.token_logprobs == pytest.approx(logprobs, rel=1e-9, abs=1e-12)


def test_top_logprobs_are_refused_in_openai_error_shape(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="hi", max_tokens=3, logprobs=1)
    body = info.value.body
    assert info.value.status_code == 400 and body["param"] == "logprobs" and "logprobs: 0" in body["message"]
    assert body["type"] == "invalid_request_error"
