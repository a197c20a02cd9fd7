"""What a :class:`~ann_kernels.generation.server.GenerationServer` hands back: the finished
:class:`Completion` (the result of ``submit``'s future), the :class:`TokenChunk` pieces of a
stream, the :class:`TokenStream` itself (a blocking iterator and an async iterator over the
same chunks), and the :class:`StepRecord` of the server's step log.

Threads: the server's worker thread pushes chunks; any number of consumer threads or event
loops read them. A stream read from an event loop binds to that loop on its first
``__anext__`` (chunks then arrive through ``loop.call_soon_threadsafe``; no thread per
waiting stream).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

__all__ = ["Completion", "GenerationFuture", "ServerBusyError", "StepRecord", "TokenChunk", "TokenStream",
           "FINISH_REASONS"]

# "eos": the model's end-of-text token; "stop": a stop string; "length": max_new_tokens;
# "deadline": the request's deadline passed (the tokens so far are kept); "cancelled".
FINISH_REASONS = ("eos", "stop", "length", "deadline", "cancelled")


class ServerBusyError(RuntimeError):
    """The server's waiting queue is full (``max_queue``): retry later (HTTP 429)."""


@dataclass
class TokenChunk:
    """New tokens of one request from one decode step: ``token_ids`` (EOS included when hit),
    ``exits`` (0-based exit of each), ``logprobs`` (each token's natural-log probability under
    the distribution that produced it: the engine's ``StepEvent.logprobs``), ``text`` (the new decoded text: held back while it may
    be the start of a stop string or an incomplete UTF-8 sequence; '' without a tokenizer),
    ``finish_reason`` (None until the request's last chunk, then one of
    :data:`FINISH_REASONS`)."""

    token_ids: list[int]
    exits: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)


@dataclass
class Completion:
    """A finished request. ``token_ids`` / ``exits``: every generated token and its exit (EOS
    included; a stop string's tokens included, its text cut); ``text``: the decoded completion
    ('' without a tokenizer), cut before a stop string; ``finish_reason``: one of
    :data:`FINISH_REASONS`; ``prompt_tokens``: the prompt's length; ``logprobs``: each
    generated token's log-probability (as ``ann_kernels.generate``'s ``out.logprobs``). Times in seconds:
    ``queue_s`` (submit to prefill), ``ttft_s`` (submit to first token; None without tokens),
    ``inter_token_s`` (one gap per token after the first: the gap between two decode steps
    divided by the tokens the later step gave), ``e2e_s`` (submit to finish)."""

    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    exits: list[int]
    text: str
    finish_reason: str
    queue_s: float
    ttft_s: float | None
    inter_token_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    mode: str = "full"
    logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class StepRecord:
    """One entry of the server's step log: ``index`` (0, 1, ... over the server's life),
    ``kind`` ("prefill", "prefill_chunk": one chunk of a long prompt's chunked prefill, or
    "decode"), ``mode`` (the batch's mode) and ``request_ids`` (the
    requests whose rows were in that forward, in slot order)."""

    index: int
    kind: str
    mode: str
    request_ids: tuple[int, ...]


class GenerationFuture(Future):
    """The future of :meth:`GenerationServer.submit`: ``cancel()`` also works while the
    request is generating (its row leaves the batch before the next decode step)."""

    def __init__(self, request_id: int) -> None:
        super().__init__()
        self.request_id = request_id


_END = object()


class TokenStream:
    """The chunks of one request as they are generated: ``for chunk in stream`` (blocking) or
    ``async for chunk in stream``. The last chunk has a ``finish_reason``; an error of the
    request is raised by the iteration. :meth:`cancel` (or ``close``) stops the request; its
    row leaves the batch before the next decode step. :attr:`future` gives the whole
    :class:`Completion`."""

    def __init__(self, future: GenerationFuture) -> None:
        self.future = future
        self.request_id = future.request_id
        self._cond = threading.Condition()
        self._items: deque = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._done = False

    # ---------------------------------------------------------------- producer (worker thread)
    def push(self, item) -> None:
        """Hand a :class:`TokenChunk`, an exception, or the end marker to the readers."""
        with self._cond:
            if self._queue is not None:
                try:
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
                except RuntimeError:  # the reader's loop has closed: nobody reads any more
                    pass
            else:
                self._items.append(item)
                self._cond.notify_all()

    def end(self) -> None:
        self.push(_END)

    # ---------------------------------------------------------------- readers
    def cancel(self) -> bool:
        """Stop generating (True unless the request had already finished)."""
        return self.future.cancel()

    close = cancel

    def __iter__(self):
        return self

    def __next__(self) -> TokenChunk:
        with self._cond:
            if self._queue is not None:
                raise RuntimeError("stream: already read by an event loop (async for); read it one way")
            while not self._items:
                if self._done:
                    raise StopIteration
                self._cond.wait()
            item = self._items.popleft()
        return self._unwrap(item, StopIteration)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenChunk:
        if self._queue is None:
            with self._cond:
                if self._queue is None:
                    self._loop = asyncio.get_running_loop()
                    self._queue = asyncio.Queue()
                    while self._items:
                        self._queue.put_nowait(self._items.popleft())
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        return self._unwrap(item, StopAsyncIteration)

    def _unwrap(self, item, stop):
        if item is _END:
            self._done = True
            raise stop
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item
