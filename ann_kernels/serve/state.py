"""What every protocol module of the HTTP app shares: :class:`ServingState` (the served
server, the model's name and input description, the metrics, the drain gate) and
:class:`ProtocolError` (an HTTP status and a message naming the bad field).

One request's life, in every protocol module (:mod:`.predict`, :mod:`.oip`):

1. read the body (:meth:`ServingState.read_body`: size limit, gzip / deflate);
2. decode it into a tensor [n, *sample_shape] (protocol-specific; errors -> 400 / 422);
3. :meth:`ServingState.submit`: refused with 503 once the server drains (SIGTERM), else the
   request is *accepted* and counted in flight;
4. :meth:`ServingState.wait` for the result (every accepted request gets exactly one answer:
   its result, the model's error, or 503 when the drain deadline passes first);
5. encode the answer; :meth:`ServingState.finish` records the outcome in the metrics.

Everything here runs on the app's event loop thread, so the in-flight counter needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from dataclasses import dataclass, field

import torch

from ann_kernels.generation.server import GenerationServer

__all__ = ["InferenceTotals", "ModelDescription", "ProtocolError", "ServingState", "describe_server", "is_generation_server"]


class ProtocolError(Exception):
    """A request the protocol rejects: ``status`` (400, 404, 413, 422, 503, ...) and a message
    that names the field and the bad value; answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ModelDescription:
    """The served model as the protocols describe it: ``name`` (OIP's model name), ``sample_shape``
    (one sample; None until known), ``dtype`` / ``device`` of the inputs, ``num_exits``."""

    name: str
    sample_shape: tuple[int, ...] | None
    dtype: torch.dtype
    device: torch.device
    num_exits: int
    extra: dict = field(default_factory=dict)


@dataclass
class InferenceTotals:
    """Cumulative counts of the inference requests answered by one app (every protocol), what
    Triton's statistics extension reports (``GET /v2/models/{name}/stats``, :mod:`.oip`):

    - ``success_count`` / ``success_ns``: requests answered 200 and their receive-to-answer time;
    - ``fail_count`` / ``fail_ns``: requests answered with an error (400, 413, 422, 500, 503;
      not 404, a request for another model);
    - ``queue_count`` / ``queue_ns``: successful requests and their summed
      ``ServedResult.queue_s`` (submit to the first stage run carrying any of their rows);
    - ``rows``: rows of the successful requests (Triton's ``inference_count``);
    - ``last_inference_ms``: wall-clock time of the last success, ms since the epoch (0: none).
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    rows: int = 0
    last_inference_ms: int = 0

    def record(self, status: int, seconds: float, result=None) -> None:
        """Count one answered request (``result``: its ``ServedResult`` when it succeeded)."""
        ns = int(seconds * 1e9)
        if status == 200 and result is not None:
            self.success_count += 1
            self.success_ns += ns
            self.queue_count += 1
            self.queue_ns += int(getattr(result, "queue_s", 0.0) * 1e9)
            self.rows += int(result.prediction.shape[0])
            self.last_inference_ms = int(time.time() * 1000)
        elif status >= 400 and status != 404:
            self.fail_count += 1
            self.fail_ns += ns


def is_generation_server(server) -> bool:
    """True for the LM :class:`~ann_kernels.generation.GenerationServer` (served with the OpenAI
    protocol), False for the classifier ``EarlyExitServer``."""
    return isinstance(server, GenerationServer)


def describe_server(server, name: str, sample_shape=None, extra: dict | None = None) -> ModelDescription:
    """:class:`ModelDescription` of an :class:`~ann_kernels.inference.EarlyExitServer` (or of a
    :class:`~ann_kernels.generation.GenerationServer`: its model's dtype and device): dtype and
    device of the model's first parameter (fp32 / CPU without one); ``sample_shape``: the given
    one, else the server's (given to it or learnt from its first request)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"model_name: expected a non-empty name without '/', got {name!r}")
    model = server.model if is_generation_server(server) else server.engine.model
    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    if sample_shape is None:
        sample_shape = server_sample_shape(server)
    return ModelDescription(name, None if sample_shape is None else tuple(int(s) for s in sample_shape),
                            dtype, device, server.num_exits, dict(extra or {}))


def server_sample_shape(server) -> tuple[int, ...] | None:
    """The sample shape the server checks requests against: ``EarlyExitServer.sample_shape``
    (None until its first request; None for a server without one, e.g. the LM's)."""
    return getattr(server, "sample_shape", None)


def server_is_closing(server) -> bool:
    """True once the server's ``close()`` was called (``closing`` / ``closed`` properties of
    ``EarlyExitServer``; ``closing`` of ``GenerationServer``)."""
    return bool(getattr(server, "closing", False) or getattr(server, "closed", False))


class ServingState:
    """Shared by the protocol modules of one app (one per :func:`~ann_kernels.serve.create_app`).

    Args:
        server: the started server (``submit(x, deadline_s=) -> concurrent.futures.Future``).
        model: its :class:`ModelDescription`.
        max_body_bytes: larger bodies (after decompression) get 413.
        metrics: a :class:`~ann_kernels.serve.metrics.ServeMetrics` or None.
    """

    def __init__(self, server, model: ModelDescription, *, max_body_bytes: int, metrics=None) -> None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: expected a positive int, got {max_body_bytes!r}")
        self.server = server
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.draining = False  # set by the drain: readiness 503, new requests 503
        self.drain_expired = False  # the drain deadline passed: waiting requests get 503
        self.in_flight = 0  # accepted (submitted) requests not yet answered
        self.totals = InferenceTotals()  # what Triton's statistics extension reports
        self._waiters: set[asyncio.Future] = set()
        self._idle: asyncio.Event | None = None

    # ------------------------------------------------------------------ readiness
    def current_sample_shape(self) -> tuple[int, ...] | None:
        """The sample shape requests must have (given, or learnt by the server from its first)."""
        return self.model.sample_shape or server_sample_shape(self.server)

    def ready(self) -> bool:
        """Accepting requests: not draining, the server not closing."""
        return not self.draining and not server_is_closing(self.server)

    # ------------------------------------------------------------------ body
    async def read_body(self, request) -> bytes:
        """The request body (``bytearray``), at most ``max_body_bytes`` (413 beyond; the declared
        Content-Length is checked before reading), gzip / deflate bodies decompressed."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise ProtocolError(400, f"content-length: expected an integer, got {length!r}") from None
            if declared > limit:
                raise ProtocolError(413, f"body: {declared} bytes exceed the limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ProtocolError(413, f"body: more than the limit of {limit} bytes")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise ProtocolError(400, f"content-encoding: expected gzip, deflate or identity, got {encoding!r}")
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            out = bytearray(inflater.decompress(bytes(body), limit + 1))
        except zlib.error as exc:
            raise ProtocolError(400, f"body: not valid {encoding} data ({exc})") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise ProtocolError(413, f"body: more than the limit of {limit} bytes once decompressed")
        return out

    # ------------------------------------------------------------------ requests
    def submit(self, x: torch.Tensor, deadline_s: float | None):
        """Accept the request (or 503 while draining / closed): the server's future."""
        self.accept()
        try:
            future = self.server.submit(x, deadline_s=deadline_s)
        except RuntimeError as exc:  # closed
            self.release()
            raise ProtocolError(503, str(exc)) from None
        return future

    def accept(self) -> None:
        """Count one request in flight (the drain waits for it), or 503 while draining; every
        accept is paired with one :meth:`release` once the request is answered."""
        if self.draining:
            raise ProtocolError(503, "server: draining (shutting down); send the request to another replica")
        self.in_flight += 1

    def release(self) -> None:
        """One accepted request has been answered."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def track(self, waiter: asyncio.Future) -> None:
        """Cancel ``waiter`` if the drain deadline passes (pair with :meth:`untrack`)."""
        self._waiters.add(waiter)

    def untrack(self, waiter: asyncio.Future) -> None:
        self._waiters.discard(waiter)

    @contextlib.contextmanager
    def request_errors(self):
        """Around the wait for an accepted request's result: a cancellation becomes 503 if the
        drain deadline passed (else it propagates), bad input the server found 422, any other
        failure of the model 500; a ProtocolError passes through."""
        try:
            yield
        except asyncio.CancelledError:
            if self.drain_expired:
                raise ProtocolError(503, "server: the drain deadline passed before this request finished") from None
            raise
        except ProtocolError:
            raise
        except (TypeError, ValueError) as exc:
            raise ProtocolError(422, str(exc)) from None
        except Exception as exc:  # noqa: BLE001  the model failed on this request
            raise ProtocolError(500, f"model: {type(exc).__name__}: {exc}") from None

    async def wait(self, future):
        """The result of an accepted request's future (errors as :meth:`request_errors`)."""
        waiter = asyncio.wrap_future(future)
        self._waiters.add(waiter)
        try:
            with self.request_errors():
                return await waiter
        finally:
            self._waiters.discard(waiter)
            self.release()

    def finish(self, protocol: str, status: int, started: float, result=None) -> None:
        """Record one answered request (any status) in :attr:`totals` and the metrics."""
        seconds = time.perf_counter() - started
        self.totals.record(status, seconds, result)
        if self.metrics is not None:
            self.metrics.observe_request(protocol, status, seconds, result)

    # ------------------------------------------------------------------ drain
    async def drain(self, timeout_s: float) -> bool:
        """Turn not-ready, refuse new requests (503) and wait up to ``timeout_s`` for the accepted
        ones to be answered. True if all finished in time; otherwise the ones still waiting are
        answered 503 (never left without an answer) and False is returned."""
        if not timeout_s >= 0 or math.isinf(timeout_s):
            raise ValueError(f"drain_timeout_s: expected finite seconds >= 0, got {timeout_s!r}")
        self.draining = True
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            self.drain_expired = True
            for waiter in list(self._waiters):
                waiter.cancel()
            while self.in_flight:  # the handlers write their 503 answers
                await asyncio.sleep(0.01)
            return False
