"""``/v1/chat/completions`` over a ``GenerationServer`` whose tokenizer has no chat template,
driven with the real ``openai`` client over loopback: the conversation becomes the documented
minimal template's text and the reply equals ``ann_kernels.generate`` on it (greedy, streamed
deltas, n = 2, logprobs), the default length fills the context, errors in OpenAI's shape; a
tokenizer with a chat template is used through ``apply_chat_template``."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install .[test])")
pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install .[serve])")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install .[serve])")

import ann_kernels  # noqa: E402
from ann_kernels.generation import GenerationServer  # noqa: E402
from ann_kernels.serve import create_app  # noqa: E402
from ann_kernels.serve.openai_chat import chat_prompt  # noqa: E402
from ann_kernels.serve.runner import HttpFront  # noqa: E402
from tests.utils import CharTokenizer, tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 0
NAME = "tiny"
TOK = CharTokenizer()
MAX_LEN = 64
MESSAGES = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi there"}]
TEMPLATE_TEXT = "system: be brief.\nuser: hi there\nassistant:"


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(TOK.vocab_size, max_len=MAX_LEN, seed=5)


@pytest.fixture(scope="module")
def client(model):
    server = GenerationServer(model, TOK, max_batch_size=4, max_wait_s=0.01, eos_token_id=EOS)
    front = HttpFront(create_app(server, model_name=NAME)).start()
    yield openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)
    front.close()
    server.close()


def reference(model, max_tokens, **kw):
    out = ann_kernels.generate(model, [TOK.encode(TEMPLATE_TEXT)], max_new_tokens=max_tokens, eos_token_id=EOS, **kw)
    return TOK.decode([t for t in out.tokens[0] if t != EOS]), out.tokens[0], out.logprobs[0]


def test_a_greedy_chat_reply_equals_generate_on_the_template(client, model):
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=9, temperature=0)
    text, tokens, _ = reference(model, 9)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.model_extra["exit_index"] and choice.logprobs is None
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(TEMPLATE_TEXT) and out.usage.completion_tokens == len(tokens)
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief."}]},
             MESSAGES[1]]
    again = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=9, temperature=0)
    assert again.choices[0].message.content == text


def test_the_default_length_is_the_rest_of_the_context(client, model):
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0)
    _, tokens, _ = reference(model, MAX_LEN - len(TEMPLATE_TEXT))
    assert out.usage.completion_tokens == len(tokens)


def test_streamed_deltas_with_logprobs_equal_the_reply(client, model):
    text, tokens, logprobs = reference(model, 10)
    deltas, roles, lps = {0: "", 1: ""}, {}, {0: [], 1: []}
    for chunk in client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0, n=2,
                                                stream=True, logprobs=True, top_logprobs=0):
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            roles.setdefault(c.index, c.delta.role)
            deltas[c.index] += c.delta.content or ""
            lps[c.index] += [(e.token, e.logprob) for e in c.logprobs.content]
    assert deltas == {0: text, 1: text} and roles == {0: "assistant", 1: "assistant"}
    for i in (0, 1):
        assert [t for t, _ in lps[i]] == [TOK.decode([t]) for t in tokens]
        assert [v for _, v in lps[i]] == pytest.approx(logprobs, rel=1e-9, abs=1e-12)
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True)
    assert [e.logprob for e in whole.choices[0].logprobs.content] == pytest.approx(logprobs, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kwargs, status, param", [
    ({"top_logprobs": 2, "logprobs": True}, 400, "top_logprobs"),
    ({"top_logprobs": 0}, 422, "top_logprobs"),  # without logprobs: true
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "UPPER"}]}, 422, None),  # outside the alphabet (the server says)
    ({"max_completion_tokens": 0}, 422, "max_completion_tokens"),
    ({"temperature": 3.0}, 422, "temperature"),
    ({"model": "other"}, 404, "model"),
    ({"extra_body": {"tools": []}}, 422, "tools"),
])
def test_bad_chat_requests_in_openai_error_shape(client, kwargs, status, param):
    args = {"model": NAME, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**args)
    body = info.value.body
    assert info.value.status_code == status and body["param"] == param and body["message"], body


def test_a_tokenizer_with_a_chat_template_uses_it():
    class Templated(CharTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "|".join(m["role"] + "=" + m["content"] for m in messages) + "|bot="

    assert chat_prompt(Templated(), MESSAGES) == "system=be brief.|user=hi there|bot="
    assert chat_prompt(TOK, MESSAGES) == TEMPLATE_TEXT
