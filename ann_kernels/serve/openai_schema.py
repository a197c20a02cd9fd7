"""The OpenAI completions API's request and answer bodies (what ``openai``'s
``client.completions.create`` sends and parses; the fields vLLM's server accepts), decoded
into :class:`~ann_kernels.generation.GenerationServer` parameters and encoded back.

Request ``POST /v1/completions``:

| field | type | default | here |
|---|---|---|---|
| ``model`` | str | the served model | another name -> 404 |
| ``prompt`` | str, [str], [int] or [[int]] | required | a list: one choice per prompt (``index`` = its position) |
| ``max_tokens`` | int >= 1 or null | 16 | ``max_new_tokens`` |
| ``temperature`` | number in [0, 2] | 1 | 0 = greedy, else sampling at that temperature |
| ``top_p`` | number in (0, 1] | 1 | nucleus sampling |
| ``stop`` | str, [str] (<= 16) or null | null | stop strings (not returned) |
| ``seed`` | int or null | null | the row's own generator: reproducible sampling |
| ``n`` | int in [1, 16] | 1 | choices per prompt (each its own row); choice ``index`` = prompt position x n + j (as OpenAI and vLLM order list prompts x n); with ``seed`` s, choice j samples with seed s + j (vLLM's rule), so each is reproducible |
| ``stream`` | bool | false | server-sent events, ``data: [DONE]`` last |
| ``stream_options`` | ``{"include_usage": bool}`` | | a last chunk with ``usage`` and no choices |
| ``best_of`` | null or n | null | only equal to ``n`` (no re-ranking) |
| ``logprobs`` | null or 0 | null | 0: each choice's ``logprobs`` (tokens, token_logprobs, text_offset; ``top_logprobs`` null: :mod:`.openai_logprobs`); >= 1 (top alternatives) -> 400 |
| ``echo``, ``suffix``, penalties, ``logit_bias`` | | off | only their "off" values |
| ``user`` | str | | ignored |
| ``top_k`` (extra) | int >= 0 | 0 | top-k sampling (as vLLM's extra field) |
| ``early_exit`` (extra) | object | the server's mode | ``{"mode", "exit_index", "threshold", "draft_len", "criterion", "kv_policy"}`` |
| ``deadline_s`` (extra) | number > 0 | none | seconds; past it the row stops (``finish_reason`` "length") |

Answer: ``{"id": "cmpl-...", "object": "text_completion", "created", "model", "choices":
[{"index", "text", "logprobs": null or {...}, "finish_reason": "stop" | "length", "exit_index": [...]}],
"usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}``. ``exit_index`` (extra) is
the 0-based exit that produced each generated token (EOS included). ``finish_reason``: "stop"
for EOS or a stop string, "length" for ``max_tokens`` or the deadline.

Errors: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape; the ``openai``
client raises ``BadRequestError`` (400), ``NotFoundError`` (404), ``UnprocessableEntityError``
(422), ``RateLimitError`` (429), ``InternalServerError`` (503) from it).
"""

from __future__ import annotations

import json
import math

from ann_kernels.serve.state import ProtocolError

__all__ = ["CompletionRequest", "decode_completion_body", "decode_completion_payload", "error_body", "FieldError",
           "FINISH_REASON", "DEFAULT_MAX_TOKENS", "parse_json_object"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
MAX_STOP = 16
MAX_PROMPTS = 64  # prompts x n (choices) per request
MAX_N = 16
MAX_LOGPROBS = 5  # OpenAI's bound for the completions API's logprobs
# our finish reasons -> OpenAI's
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "deadline": "length", "cancelled": "stop"}
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ERROR_CODES = {404: "model_not_found", 413: "request_too_large", 429: "server_busy", 503: "service_unavailable"}
# OpenAI fields we accept only at their "off" value
OFF_VALUES = {"echo": (False, None), "suffix": (None, ""),
              "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {})}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "best_of", "logprobs", "stream",
         "stream_options", "user", "top_k", "early_exit", "deadline_s", *OFF_VALUES}
EARLY_EXIT_KEYS = {"mode", "exit_index", "threshold", "draft_len", "criterion", "kv_policy"}


class FieldError(ProtocolError):
    """A ProtocolError that names the offending request field (OpenAI's ``param``)."""

    def __init__(self, status: int, param: str | None, message: str) -> None:
        super().__init__(status, message)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object for an HTTP status."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": ERROR_CODES.get(status)}}


class CompletionRequest:
    """A decoded request: ``prompts`` (strings or token-id lists), ``params`` (GenerationServer
    parameters, shared by the prompts), ``n`` (choices per prompt), ``logprobs`` (None or 0),
    ``stream``, ``include_usage``, ``model``."""

    def __init__(self, prompts, params: dict, stream: bool, include_usage: bool, model: str, n: int = 1,
                 logprobs: int | None = None) -> None:
        self.prompts, self.params, self.stream, self.include_usage, self.model, self.n = (
            prompts, params, stream, include_usage, model, n)
        self.logprobs = logprobs

    def choices(self):
        """(prompt, params) of every choice in ``index`` order: prompt i's n choices are
        indices i * n .. i * n + n - 1; with a ``seed`` s, choice j of a prompt samples with
        seed s + j (vLLM ``v1/engine/parallel_sampling.py``,
        ``ParentRequest._get_child_sampling_params``: a child's ``seed = seed + index``), so
        choice 0 equals the n = 1 answer."""
        seed = self.params.get("seed")
        for prompt in self.prompts:
            for j in range(self.n):
                yield prompt, (self.params if seed is None or j == 0 else {**self.params, "seed": seed + j})


def _number(payload, name, lo, hi, *, lo_open=False):
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > hi or value < lo or (lo_open and value == lo):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise FieldError(422, name, f"{name}: expected a number in {span}, got {value!r}")
    return float(value)


def _int(payload, name, lo):
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise FieldError(422, name, f"{name}: expected an integer >= {lo}, got {value!r}")
    return value


def _prompts(prompt):
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise FieldError(422, "prompt", "prompt: expected a non-empty string, a list of strings, a list of token ids "
                                    f"or a list of token-id lists, got {json.dumps(prompt)[:80]}")


def _early_exit(value) -> dict:
    if not isinstance(value, dict):
        raise FieldError(422, "early_exit", f"early_exit: expected an object {sorted(EARLY_EXIT_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - EARLY_EXIT_KEYS)
    if unknown:
        raise FieldError(422, "early_exit", f"early_exit: unknown fields {unknown}; expected some of "
                                            f"{sorted(EARLY_EXIT_KEYS)}")
    return {k: v for k, v in value.items() if v is not None or k == "threshold"}


def parse_json_object(body: bytes, required: str) -> dict:
    """The body's JSON object; FieldError 400 when it is not valid JSON or not an object."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FieldError(400, None, f"body: not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise FieldError(400, None, f"body: expected a JSON object with 'model' and '{required}'")
    return payload


def decode_completion_body(body: bytes, served_model: str) -> CompletionRequest:
    """A :class:`CompletionRequest` from the body; FieldError 400 (not a JSON object), 404 (another
    model), 422 (a field's type or value) otherwise."""
    return decode_completion_payload(parse_json_object(body, "prompt"), served_model)


def decode_completion_payload(payload: dict, served_model: str) -> CompletionRequest:
    """:func:`decode_completion_body` after the JSON parse (the chat route maps its body onto
    this one)."""
    unknown = sorted(set(payload) - KNOWN)
    if unknown:
        raise FieldError(422, unknown[0], f"body: unknown fields {unknown} (our own settings go in 'early_exit')")
    model = payload.get("model", served_model)
    if model != served_model:
        raise FieldError(404, "model", f"model: {model!r} does not exist here; this server serves {served_model!r}")
    for name, allowed in OFF_VALUES.items():
        if name in payload and payload[name] not in allowed:
            raise FieldError(422, name, f"{name}: not supported by this server (got {payload[name]!r})")
    if "prompt" not in payload:
        raise FieldError(422, "prompt", "prompt: required")
    prompts = _prompts(payload["prompt"])
    if len(prompts) > MAX_PROMPTS:
        raise FieldError(422, "prompt", f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    params: dict = {"max_new_tokens": DEFAULT_MAX_TOKENS}
    if payload.get("max_tokens") is not None:
        params["max_new_tokens"] = _int(payload, "max_tokens", 1)
    temperature = 1.0 if payload.get("temperature") is None else _number(payload, "temperature", 0.0, 2.0)
    if temperature > 0:
        params.update(do_sample=True, temperature=temperature)
    else:
        params["do_sample"] = False
    if payload.get("top_p") is not None:
        params["top_p"] = _number(payload, "top_p", 0.0, 1.0, lo_open=True)
    if payload.get("top_k") is not None:
        params["top_k"] = _int(payload, "top_k", 0)
    if payload.get("seed") is not None:
        params["seed"] = _int(payload, "seed", -(1 << 63))
    stop = payload.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or any(not isinstance(s, str) or not s for s in stop):
            raise FieldError(422, "stop", f"stop: expected a non-empty string or up to {MAX_STOP} of them, "
                                          f"got {payload['stop']!r}")
        params["stop"] = stop
    n = 1 if payload.get("n") is None else _int(payload, "n", 1)
    if n > MAX_N:
        raise FieldError(422, "n", f"n: at most {MAX_N} choices per prompt, got {n}")
    if len(prompts) * n > MAX_PROMPTS:
        raise FieldError(422, "n", f"n: {len(prompts)} prompts x n {n} = {len(prompts) * n} choices; at most "
                                   f"{MAX_PROMPTS} per request")
    if payload.get("best_of") is not None and payload["best_of"] != n:
        raise FieldError(422, "best_of", f"best_of: only null or equal to n ({n}) is supported, got "
                                         f"{payload['best_of']!r}")
    logprobs = payload.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
            raise FieldError(422, "logprobs", f"logprobs: expected an integer in [0, {MAX_LOGPROBS}] or null, "
                                              f"got {logprobs!r}")
        if logprobs > 0:
            raise FieldError(400, "logprobs", f"logprobs: {logprobs} top alternatives per token are not available "
                                              "(the engine returns the chosen token's log-probability only); "
                                              "logprobs: 0 gives tokens, token_logprobs and text_offset")
    if payload.get("deadline_s") is not None:
        params["deadline_s"] = _number(payload, "deadline_s", 0.0, 1e9, lo_open=True)
    if payload.get("early_exit") is not None:
        params.update(_early_exit(payload["early_exit"]))
    stream = payload.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise FieldError(422, "stream", f"stream: expected true or false, got {stream!r}")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise FieldError(422, "stream_options", f"stream_options: expected {{'include_usage': bool}}, got {options!r}")
    if options and not stream:
        raise FieldError(422, "stream_options", "stream_options: only with stream: true")
    return CompletionRequest(prompts, params, bool(stream), bool(options.get("include_usage")), served_model, n,
                             logprobs)
