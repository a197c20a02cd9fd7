"""Running the app with uvicorn, and the graceful drain.

:class:`DrainingServer` is a ``uvicorn.Server`` whose first SIGTERM (or SIGINT) drains
instead of stopping at once:

1. readiness turns 503 (``/v2/health/ready``, ``/v2/models/{name}/ready``, ``/healthz``) and
   every new inference request gets 503 (the listener stays open, so a client sees an answer,
   not a refused connection, until the drain ends);
2. every accepted request finishes and is answered (at most ``drain_timeout_s``; past it, the
   ones still waiting are answered 503 rather than cut off);
3. ``on_drained`` runs (the CLI closes the :class:`~ann_kernels.inference.EarlyExitServer`), then
   uvicorn stops; ``ann-kernels serve`` exits 0 (1 if the deadline forced 503 answers).

A second signal during the drain stops uvicorn at once (its own shutdown).

Before serving, :func:`serve_until_drained` freezes the objects alive after loading
(:func:`freeze_startup_objects`, ``gc.freeze()``; ``ann-kernels serve --no-gc-freeze`` skips it).

:class:`HttpFront` runs the same server on a background thread (tests, notebooks, examples);
its :meth:`HttpFront.drain` is the SIGTERM path without a signal.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time

from ann_kernels.serve.app import create_app, require_serve_extra

_, uvicorn = require_serve_extra()

__all__ = ["DrainingServer", "HttpFront", "freeze_startup_objects", "serve_until_drained", "start_http"]


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on the first SIGTERM / SIGINT (module docstring).

    Args:
        config: the ``uvicorn.Config`` (its app made by :func:`~ann_kernels.serve.create_app`).
        state: the app's :class:`~ann_kernels.serve.state.ServingState` (``app.state.serving``).
        drain_timeout_s: longest wait for the accepted requests.
        on_drained: called (in a thread) once they are answered, before uvicorn stops.
    """

    def __init__(self, config, state, *, drain_timeout_s: float = 30.0, on_drained=None) -> None:
        super().__init__(config)
        if isinstance(drain_timeout_s, bool) or not isinstance(drain_timeout_s, (int, float)) \
                or not 0 <= drain_timeout_s < float("inf"):
            raise ValueError(f"drain_timeout_s: expected finite seconds >= 0, got {drain_timeout_s!r}")
        self.state = state
        self.drain_timeout_s = float(drain_timeout_s)
        self.on_drained = on_drained
        self.drain_requested = False
        self.drained: bool | None = None  # None: never drained; else every request finished in time
        self.drain_seconds: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:  # the signal handler: only flags (on_tick acts)
        if self.drain_requested:
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own shutdown
        else:
            self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain_task is None:
            self.start_drain()
        return await super().on_tick(counter)

    def start_drain(self, timeout_s: float | None = None) -> asyncio.Future:
        """Start the drain on the running loop (idempotent); the task's result: drained in time."""
        if self._drain_task is None:
            self.drain_requested = True
            self._drain_task = asyncio.ensure_future(self._drain(
                self.drain_timeout_s if timeout_s is None else timeout_s))
        return self._drain_task

    async def _drain(self, timeout_s: float) -> bool:
        start = time.perf_counter()
        try:
            ok = await self.state.drain(timeout_s)
            if self.on_drained is not None:
                await asyncio.to_thread(self.on_drained)
        finally:
            self.should_exit = True
        self.drained, self.drain_seconds = ok, time.perf_counter() - start
        return ok


def freeze_startup_objects() -> int:
    """``gc.collect()`` then ``gc.freeze()``: every object alive now (after loading: the model,
    torch's and the libraries' module state, ~2-3 x 10^5 objects) leaves the cyclic garbage
    collector's generations for good. Returns how many are frozen.

    Why, measured on the saturated MLP server (docs/serving_performance.md): the collector's
    full collections rescan all of them, ~0.3-0.4 s each on this machine, and one comes every
    ~10^4 answered requests (the futures and results clients hold push objects into the old
    generation), i.e. a latency spike of that size and ~13 us per request on average; after
    the freeze a full collection scans only what serving allocated. Process-wide and one-way
    for the objects frozen (they are never collected as cyclic garbage, which objects that
    live as long as the serving process never become): ``ann-kernels serve`` calls it once,
    after the model is loaded and the server started (``--no-gc-freeze`` skips it); a program
    that embeds a server decides for itself."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve_until_drained(app, server, args, *, finished) -> int:
    """Serve ``app`` with uvicorn on ``args.host:args.port`` until SIGTERM / SIGINT, drain the
    accepted requests (``args.drain_timeout_s``), close the started ``server`` (always, also on an
    error); the exit status: 0 when every accepted request was answered in time (or no drain
    happened), else 1. ``finished(server.stats())`` words what was served, for the drain line.
    ``args.gc_freeze``: :func:`freeze_startup_objects` first (and say so on stdout).
    Used by ``ann-kernels serve`` for classifier and LM checkpoints alike."""
    try:
        if args.gc_freeze:
            print(f"gc: froze {freeze_startup_objects()} objects alive after loading (gc.freeze; "
                  f"--no-gc-freeze keeps them in the collector)", flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        runner = DrainingServer(config, app.state.serving, drain_timeout_s=args.drain_timeout_s,
                                on_drained=server.close)
        runner.run()
    finally:
        server.close(timeout=args.drain_timeout_s)
    if runner.drained is None:
        return 0
    print(f"drained in {runner.drain_seconds:.2f} s: {finished(server.stats())}, "
          f"{'all' if runner.drained else 'NOT all'} accepted requests answered "
          f"before the {args.drain_timeout_s} s deadline", flush=True)
    return 0 if runner.drained else 1


class HttpFront:
    """uvicorn serving an app on a background thread (tests, notebooks, examples).
    ``port=0`` binds an ephemeral port; :attr:`port` tells which. :meth:`close` stops it, and
    :meth:`drain` drains it as SIGTERM does (the server behind the app stays the caller's to close)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout_s: float = 30.0) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                                timeout_graceful_shutdown=5)
        self._uvicorn = DrainingServer(config, app.state.serving, drain_timeout_s=drain_timeout_s)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="HttpFront", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> HttpFront:
        """Start serving (idempotent); waits until uvicorn listens."""
        if not self._thread.is_alive() and not self._uvicorn.started:
            self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"serve: uvicorn did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def drain(self, timeout_s: float | None = None) -> bool:
        """Drain as on SIGTERM (readiness 503, new requests 503, accepted ones answered), then
        stop; True if every accepted request finished within ``timeout_s`` (default: the
        front's ``drain_timeout_s``)."""
        async def run() -> bool:
            return await self._uvicorn.start_drain(timeout_s)

        ok = asyncio.run_coroutine_threadsafe(run(), self._uvicorn.loop).result()
        self._thread.join(30)
        self._socket.close()
        return ok

    def close(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> HttpFront:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def start_http(server, host: str = "127.0.0.1", port: int = 0, **app_kwargs) -> HttpFront:
    """:class:`HttpFront` for ``server`` (started), on ``host:port`` (0: ephemeral); ``app_kwargs``
    go to :func:`~ann_kernels.serve.create_app`."""
    return HttpFront(create_app(server, **app_kwargs), host, port).start()
