"""HTTP front of :class:`~ann_kernels.inference.EarlyExitServer` on a standard ASGI stack
(FastAPI + uvicorn: the optional extra ``pip install ann_kernels[serve]``; imported only
when this module's functions are called, so the package works without them).

Endpoints (JSON in, JSON out):

- ``POST /predict`` with ``{"inputs": [[...], ...], "deadline_s": 0.05}`` (inputs: a nested
  list shaped [n, *sample_shape], n >= 1; ``deadline_s`` optional) ->
  ``{"prediction": [n ints], "exit_index": [n ints], "confidence": [n floats],
  "samples_per_exit": [K ints], "mean_flops": float, "latency_s": float,
  "deadline_exit": int | null}``.
- ``GET /stats`` -> :meth:`~ann_kernels.inference.ServerStats.as_dict`.
- ``GET /healthz`` -> ``{"status": "ok", ...}`` (503 once the server is closing).

Errors: a body over ``max_body_bytes`` -> 413; not JSON -> 400; JSON of the wrong structure
or inputs of the wrong shape / type -> 422; the model failing on a request -> 500; each with
``{"error": "..."}`` naming the problem.

``ann-kernels serve --checkpoint runs/x/last.pt --port 8000 [--budget B]`` runs this (see
:mod:`ann_kernels.inference.commands`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint's parameter
# annotation (fastapi.Request, imported lazily) at route creation.
import asyncio
import json
import math
import socket
import threading
import time

import torch

__all__ = ["HttpFront", "create_app", "require_serve_extra", "start_http"]

DEFAULT_MAX_BODY_BYTES = 8 << 20


def require_serve_extra():  # noqa: D401
    """(fastapi, uvicorn), or ImportError saying how to install them."""
    try:
        import fastapi
        import uvicorn
    except ImportError as error:
        raise ImportError(
            "serve: the HTTP front needs FastAPI and uvicorn: pip install 'ann_kernels[serve]' "
            f"(missing: {error.name})"
        ) from error
    return fastapi, uvicorn


def create_app(server, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, info: dict | None = None):
    """A FastAPI app serving ``server`` (an :class:`~ann_kernels.inference.EarlyExitServer`,
    started by the caller). ``info``: extra fields for ``/healthz`` (e.g. the checkpoint)."""
    fastapi, _ = require_serve_extra()
    from fastapi.responses import JSONResponse

    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive int, got {max_body_bytes!r}")
    app = fastapi.FastAPI(title="ann_kernels early-exit server", docs_url=None, redoc_url=None)
    dtype = server._dtype or torch.float32
    device = server._device or torch.device("cpu")
    extra = dict(info or {})

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/healthz")
    async def healthz():
        if server._closing or server._closed:
            return JSONResponse({"status": "closing"}, status_code=503)
        return {"status": "ok", "num_exits": server.num_exits,
                "sample_shape": list(server._sample_shape) if server._sample_shape else None, **extra}

    @app.get("/stats")
    async def stats():
        return server.stats().as_dict()

    @app.post("/predict")
    async def predict(request: fastapi.Request):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return error(400, f"content-length: expected an integer, got {length!r}")
            if declared > max_body_bytes:
                return error(413, f"body: {declared} bytes exceed the limit of {max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return error(413, f"body: more than the limit of {max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"body: not valid JSON ({exc})")
        if not isinstance(payload, dict) or "inputs" not in payload:
            return error(422, 'body: expected a JSON object {"inputs": [[...], ...], "deadline_s": optional}')
        unknown = sorted(set(payload) - {"inputs", "deadline_s"})
        if unknown:
            return error(422, f"body: unknown fields {unknown}; expected 'inputs' and optionally 'deadline_s'")
        deadline_s = payload.get("deadline_s")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))):
            return error(422, f"deadline_s: expected seconds (a number) or null, got {deadline_s!r}")
        inputs = payload["inputs"]
        if not isinstance(inputs, list) or not inputs:
            return error(422, "inputs: expected a non-empty nested list [n, *sample_shape]")
        try:
            x = torch.tensor(inputs, dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            return error(422, f"inputs: expected a rectangular nested list of numbers [n, *sample_shape] ({exc})")
        try:
            future = server.submit(x, deadline_s=deadline_s)
        except RuntimeError as exc:  # closed
            return error(503, str(exc))
        try:
            result = await asyncio.wrap_future(future)
        except (TypeError, ValueError) as exc:
            return error(422, str(exc))
        except Exception as exc:  # noqa: BLE001  the model failed on this request
            return error(500, f"model: {type(exc).__name__}: {exc}")
        s = result.stats
        return {
            "prediction": result.prediction.tolist(),
            "exit_index": result.exit_index.tolist(),
            "confidence": [None if math.isnan(c) else c for c in result.confidence.tolist()],
            "samples_per_exit": list(s.samples_per_exit),
            "mean_flops": s.mean_flops,
            "latency_s": s.total_seconds,
            "deadline_exit": s.deadline_exit,
        }

    return app


class HttpFront:
    """uvicorn serving :func:`create_app` on a background thread (tests, notebooks, examples).
    ``port=0`` binds an ephemeral port; :attr:`port` tells which. :meth:`close` stops it
    (the :class:`EarlyExitServer` stays the caller's to close)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        _, uvicorn = require_serve_extra()
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="HttpFront", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "HttpFront":
        """Start serving (idempotent); waits until uvicorn listens."""
        if not self._thread.is_alive() and not self._uvicorn.started:
            self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"serve: uvicorn did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def close(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "HttpFront":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def start_http(server, host: str = "127.0.0.1", port: int = 0, **app_kwargs) -> "HttpFront":
    """:class:`HttpFront` for ``server`` (started), on ``host:port`` (0: ephemeral)."""
    return HttpFront(create_app(server, **app_kwargs), host, port).start()
