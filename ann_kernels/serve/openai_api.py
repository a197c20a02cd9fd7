"""OpenAI-compatible routes over a :class:`~ann_kernels.generation.GenerationServer` (what
the ``openai`` Python client, vLLM's and SGLang's benchmark clients and LangChain's OpenAI
wrapper call):

- ``POST /v1/completions``: bodies and answers in :mod:`.openai_schema` (``n`` choices per prompt:
  one row each, in ``index`` order); ``stream: true``
  answers server-sent events (``data: {chunk}`` per decode step that gave the request new
  text or tokens, ``data: [DONE]`` last); a client that disconnects mid-stream (or
  mid-request) cancels its rows, which leave the batch before the next decode step;
- ``POST /v1/chat/completions``: the same over a conversation (``messages`` made into one
  prompt by the tokenizer's chat template or a minimal one: :mod:`.openai_chat`), answered in
  the chat shape;
- ``GET /v1/models`` and ``GET /v1/models/{name}``: the served model (``max_model_len``,
  ``num_exits`` extra);
- ``GET /stats``: :meth:`GenerationServer.stats`; ``GET /healthz``: 200, or 503 while draining.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 a body that is
not a JSON object, 404 another model or an unknown route, 413 a body over the limit, 422 a bad
field (the message and ``param`` name it), 429 the server's queue is full (``Retry-After``),
503 draining or closed, 500 the model failed. Each HTTP request counts once in flight (the
drain of :mod:`.runner` waits for it).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' parameter
# annotations (fastapi.Request, imported lazily) at route creation.
import asyncio
import json
import time
import uuid

from ann_kernels.generation.requests import ServerBusyError
from ann_kernels.serve.openai_chat import ChatShape, decode_chat_body
from ann_kernels.serve.openai_logprobs import CompletionLogprobs
from ann_kernels.serve.openai_schema import FINISH_REASON, FieldError, decode_completion_body, error_body
from ann_kernels.serve.state import ProtocolError, ServingState

__all__ = ["add_openai_error_handlers", "add_openai_routes", "model_card"]

PROTOCOL = "openai"
DISCONNECT_POLL_S = 0.25


def model_card(state: ServingState, created: int) -> dict:
    server = state.server
    return {"id": state.model.name, "object": "model", "created": created, "owned_by": "ann_kernels",
            "max_model_len": server.max_len, "num_exits": server.num_exits, **state.model.extra}


def _error(exc: ProtocolError, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(exc.status, exc.message, getattr(exc, "param", None)), status_code=exc.status,
                        headers=headers)


def add_openai_error_handlers(app) -> None:
    """Unknown routes (404), wrong methods (405) and handler bugs (500) in OpenAI's error shape."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return JSONResponse(error_body(500, f"internal: {type(exc).__name__}: {exc}"), status_code=500)


def _submit_all(state: ServingState, req):
    """Accept the HTTP request and submit each prompt (streams or futures); on any refusal the
    ones already submitted are cancelled and the request released."""
    state.accept()
    handles = []
    try:
        for prompt, params in req.choices():
            if req.stream:
                handles.append(state.server.stream(prompt, **params))
            else:
                handles.append(state.server.submit(prompt, **params))
    except Exception as exc:
        for h in handles:
            h.cancel()
        state.release()
        if isinstance(exc, ServerBusyError):
            raise ProtocolError(429, str(exc)) from None
        if isinstance(exc, ValueError):
            raise ProtocolError(422, str(exc)) from None
        if isinstance(exc, RuntimeError):
            raise ProtocolError(503, str(exc)) from None
        raise
    return handles


def _choice(index: int, text: str, exits, reason, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": None if reason is None else FINISH_REASON[reason], "exit_index": list(exits)}


class CompletionShape:
    """How ``/v1/completions`` answers look: the object names and a choice of a finished
    :class:`~ann_kernels.generation.requests.Completion` or of a streamed chunk (``lp``: its
    :class:`CompletionLogprobs` object or None); :class:`.openai_chat.ChatShape` is the chat
    route's."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    @staticmethod
    def choice(index: int, completion, lp) -> dict:
        return _choice(index, completion.text, completion.exits, completion.finish_reason, lp)

    @staticmethod
    def chunk_choice(index: int, chunk, lp, first: bool) -> dict:
        return _choice(index, chunk.text, chunk.exits, chunk.finish_reason, lp)


def _usage(completions, n: int) -> dict:
    """OpenAI's usage: a prompt counts once however many choices it has (``n``)."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _wait_all(state: ServingState, request, futures):
    """The completions of ``futures``; cancels them if the client goes away or the drain
    deadline passes."""
    waiters = [asyncio.wrap_future(f) for f in futures]
    gathered = asyncio.gather(*waiters)
    state.track(gathered)
    try:
        with state.request_errors():
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
                if done:
                    return gathered.result()
                if await request.is_disconnected():
                    gathered.cancel()
                    raise asyncio.CancelledError
    finally:
        for f in futures:  # the other prompts of a failed or abandoned request stop too (no-op once done)
            f.cancel()
        state.untrack(gathered)


def _sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def add_openai_routes(app, state: ServingState) -> None:
    """Register ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/stats`` and
    ``/healthz`` on ``app``."""
    import fastapi
    from fastapi.responses import JSONResponse

    server = state.server
    created = int(time.time())

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(state, created)]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name != state.model.name:
            return _error(FieldError(404, "model", f"model: {name!r} does not exist here; this server serves "
                                                   f"{state.model.name!r}"))
        return model_card(state, created)

    @app.get("/healthz")
    async def healthz():
        if not state.ready():
            return JSONResponse({"status": "closing"}, status_code=503)
        return {"status": "ok", "num_exits": server.num_exits, "max_model_len": server.max_len, **state.model.extra}

    @app.get("/stats")
    async def stats():
        return server.stats().as_dict()

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await _complete(state, request, lambda body: decode_completion_body(body, state.model.name),
                               CompletionShape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await _complete(state, request, lambda body: decode_chat_body(body, state.model.name, server),
                               ChatShape)


async def _complete(state: ServingState, request, decode, shape):
    """One completions-style request: ``decode(body)`` -> CompletionRequest, answered in
    ``shape`` (:class:`CompletionShape` or :class:`.openai_chat.ChatShape`)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    started = time.perf_counter()
    try:
        req = decode(await state.read_body(request))
        handles = _submit_all(state, req)
    except ProtocolError as exc:
        response = _error(exc, {"Retry-After": "1"} if exc.status == 429 else None)
        state.finish(PROTOCOL, exc.status, started)
        return response
    head = {"id": f"{shape.id_prefix}{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
            "model": state.model.name}
    if req.stream:
        events = _events(state, req, handles, {**head, "object": shape.chunk_object}, started, shape)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        done = await _wait_all(state, request, handles)
        decode_text = state.server.decode
        choices = [shape.choice(i, c, None if req.logprobs is None
                                else CompletionLogprobs(decode_text).add(c.token_ids, c.logprobs))
                   for i, c in enumerate(done)]
        response = JSONResponse({**head, "choices": choices, "usage": _usage(done, req.n)})
    except ProtocolError as exc:
        response = _error(exc)
    finally:
        state.release()
    state.finish(PROTOCOL, response.status_code, started)
    return response


async def _events(state: ServingState, req, streams, head: dict, started: float, shape=CompletionShape):
    """The server-sent events of a streamed request (module docstring)."""
    queue: asyncio.Queue = asyncio.Queue()
    builders = None if req.logprobs is None else [CompletionLogprobs(state.server.decode) for _ in streams]
    first = [True] * len(streams)  # the chat shape names the role in a choice's first delta

    async def pump(index, stream):
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as exc:  # noqa: BLE001  this request's error: reported in the stream
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    guard = asyncio.get_running_loop().create_future()  # cancelled if the drain deadline passes
    guard.add_done_callback(lambda _: [s.cancel() for s in streams])
    state.track(guard)
    status = 200
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, Exception):
                status = 422 if isinstance(item, (TypeError, ValueError)) else 500
                yield _sse(error_body(status, f"model: {type(item).__name__}: {item}"))
                break
            if item.text or item.token_ids or item.finish_reason is not None:
                lp = None if builders is None else builders[index].add(item.token_ids, item.logprobs)
                yield _sse({**head, "choices": [shape.chunk_choice(index, item, lp, first[index])]})
                first[index] = False
        if status == 200 and req.include_usage:
            done = [s.future.result() for s in streams]
            yield _sse({**head, "choices": [], "usage": _usage(done, req.n)})
        yield _sse(b"[DONE]")
    except BaseException:  # the client went away (the response task is cancelled) or a bug
        status = 499
        raise
    finally:
        for s in streams:
            s.cancel()  # a no-op for finished requests; frees the rows of a cut-off stream
        for t in tasks:
            t.cancel()
        state.untrack(guard)
        if not guard.done():
            guard.cancel()
        state.release()
        state.finish(PROTOCOL, status, started)
