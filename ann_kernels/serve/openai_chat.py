"""``POST /v1/chat/completions`` for models without a chat template: the request's ``messages``
become one prompt, answered in the chat completions shape (``chat.completion`` objects,
``message`` / streamed ``delta`` choices). Everything else (sampling fields, ``n``, ``stop``,
``seed``, ``stream``, our ``early_exit``, errors) is the completions route's
(:mod:`.openai_schema`), so the two cannot drift.

The prompt: the tokenizer's own chat template when it has one (a ``transformers`` tokenizer
with ``chat_template`` set: ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)``); otherwise this module's minimal template, one line per message
and the assistant's cue (:func:`chat_prompt`)::

    system: You are terse.
    user: hello
    assistant:

Our checkpoints are plain language models, not trained on any chat format: the template only
makes a conversation into text they continue; pass ``stop: ["\\nuser:"]`` to end the reply at
the next turn the model invents.

Request fields beyond the completions route's: ``messages`` (required: objects with ``role``
in system / developer / user / assistant and ``content``, a string or a list of
``{"type": "text", "text"}`` parts), ``max_completion_tokens`` (the newer name of
``max_tokens``; default: the rest of the model's context after the prompt), ``logprobs``
(bool) with ``top_logprobs`` (0 only; >= 1 is refused with 400, as the completions route's
``logprobs >= 1``). ``choices[i].logprobs`` is then ``{"content": [{"token", "logprob",
"bytes", "top_logprobs": []}]}`` (the same values as the completions route's
:mod:`.openai_logprobs`).
"""

from __future__ import annotations

from ann_kernels.serve.openai_schema import (
    FINISH_REASON,
    KNOWN,
    FieldError,
    decode_completion_payload,
    parse_json_object,
)

__all__ = ["ChatShape", "chat_prompt", "decode_chat_body", "ROLES"]

ROLES = ("system", "developer", "user", "assistant")
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
CHAT_KNOWN = (KNOWN - {"prompt", "echo", "suffix", "best_of", "logprobs"}) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs"}


def _content(i: int, message) -> str:
    if not isinstance(message, dict) or message.get("role") not in ROLES or set(message) - {"role", "content", "name"}:
        raise FieldError(422, "messages", f"messages[{i}]: expected {{'role': one of {list(ROLES)}, 'content': "
                                          f"text}}, got {str(message)[:80]}")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise FieldError(422, "messages", f"messages[{i}].content: expected a string or a list of text parts, "
                                          f"got {str(content)[:80]}")
    return content


def chat_prompt(tokenizer, messages) -> str:
    """The prompt text of ``messages`` (module docstring); FieldError 422 naming a bad message."""
    if not isinstance(messages, list) or not messages:
        raise FieldError(422, "messages", "messages: expected a non-empty list of {'role', 'content'} objects")
    contents = [_content(i, m) for i, m in enumerate(messages)]
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        plain = [{"role": m["role"], "content": c} for m, c in zip(messages, contents)]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {c}\n" for m, c in zip(messages, contents)) + "assistant:"


def decode_chat_body(body: bytes, served_model: str, server):
    """The :class:`~ann_kernels.serve.openai_schema.CompletionRequest` of a chat body (its
    ``messages`` as the prompt); FieldError as the completions route, naming chat fields."""
    payload = parse_json_object(body, "messages")
    unknown = sorted(set(payload) - CHAT_KNOWN)
    if unknown:
        raise FieldError(422, unknown[0], f"body: unknown fields {unknown} (our own settings go in 'early_exit')")
    if "messages" not in payload:
        raise FieldError(422, "messages", "messages: required")
    mapped = {k: v for k, v in payload.items() if k not in ("messages", "max_completion_tokens", "logprobs",
                                                              "top_logprobs")}
    mapped["prompt"] = prompt = chat_prompt(server.tokenizer, payload["messages"])
    limit = payload.get("max_completion_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise FieldError(422, "max_completion_tokens", f"max_completion_tokens: expected an integer >= 1, "
                                                           f"got {limit!r}")
        mapped["max_tokens"] = limit
    elif mapped.get("max_tokens") is None:
        try:  # the rest of the context (at least 1: a prompt that fills it is refused by the server)
            mapped["max_tokens"] = max(1, server.max_len - len(server.encode(prompt)))
        except ValueError as exc:
            raise FieldError(422, "messages", f"messages: {exc}") from None
    logprobs, top = payload.get("logprobs"), payload.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise FieldError(422, "logprobs", f"logprobs: expected true or false, got {logprobs!r}")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise FieldError(422, "top_logprobs", f"top_logprobs: expected an integer in [0, {MAX_TOP_LOGPROBS}], "
                                                  f"got {top!r}")
        if not logprobs:
            raise FieldError(422, "top_logprobs", "top_logprobs: only with logprobs: true")
        if top > 0:
            raise FieldError(400, "top_logprobs", f"top_logprobs: {top} alternatives per token are not available "
                                                  "(the engine returns the chosen token's log-probability only); "
                                                  "use top_logprobs: 0")
    if logprobs:
        mapped["logprobs"] = 0
    return decode_completion_payload(mapped, served_model)


def _chat_logprobs(lp: dict | None):
    if lp is None:
        return None
    return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, v in zip(lp["tokens"], lp["token_logprobs"])]}


class ChatShape:
    """How ``/v1/chat/completions`` answers look (the completions route's ``CompletionShape``
    counterpart)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    @staticmethod
    def choice(index: int, completion, lp) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": _chat_logprobs(lp), "finish_reason": FINISH_REASON[completion.finish_reason],
                "exit_index": list(completion.exits)}

    @staticmethod
    def chunk_choice(index: int, chunk, lp, first: bool) -> dict:
        delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        return {"index": index, "delta": delta, "logprobs": _chat_logprobs(lp),
                "finish_reason": None if chunk.finish_reason is None else FINISH_REASON[chunk.finish_reason],
                "exit_index": list(chunk.exits)}
