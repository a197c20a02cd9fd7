"""The HTTP app: one FastAPI application over one server, a module per protocol.

``create_app(server, model_name=...)`` registers, for an
:class:`~ann_kernels.inference.EarlyExitServer`:

- ``predict``: our JSON ``POST /predict``, ``GET /stats``, ``GET /healthz`` (:mod:`.predict`);
- ``oip``: the Open Inference Protocol v2 ``/v2/...`` routes, JSON and binary tensors (:mod:`.oip`);
- ``GET /metrics`` in Prometheus format (:mod:`.metrics`; when prometheus_client is installed).

All of them share one :class:`~ann_kernels.serve.state.ServingState` (``app.state.serving``):
the model's description, the body limit, the metrics and the drain gate that
:mod:`.runner` closes on SIGTERM. A protocol module is a function ``add_routes(app, state)``
in :data:`PROTOCOLS`; a server of another kind (the LM ``GenerationServer``) has its own:

- ``openai``: ``POST /v1/completions``, ``GET /v1/models``, ``GET /stats``, ``GET /healthz``
  (:mod:`.openai_api`; errors in OpenAI's shape), ``/metrics`` from :mod:`.lm_metrics`.
"""

from __future__ import annotations

from ann_kernels.serve.oip import add_oip_routes
from ann_kernels.serve.openai_api import add_openai_error_handlers, add_openai_routes
from ann_kernels.serve.predict import add_predict_routes
from ann_kernels.serve.state import ServingState, describe_server, is_generation_server

__all__ = ["DEFAULT_MAX_BODY_BYTES", "PROTOCOLS", "create_app", "require_serve_extra"]

DEFAULT_MAX_BODY_BYTES = 8 << 20
# protocol name -> add_routes(app, state)
PROTOCOLS = {"predict": add_predict_routes, "oip": add_oip_routes, "openai": add_openai_routes}
DEFAULT_PROTOCOLS = ("predict", "oip")  # a classifier's EarlyExitServer
LM_PROTOCOLS = ("openai",)  # an LM's GenerationServer


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


def add_error_handlers(app) -> None:
    """Every error answer is ``{"error": "..."}`` (what OIP clients parse): unknown routes (404),
    wrong methods (405), and (500) a bug in a handler."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return JSONResponse({"error": f"internal: {type(exc).__name__}: {exc}"}, status_code=500)


def create_app(server, *, model_name: str = "model", sample_shape=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               info: dict | None = None, protocols=None, metrics: bool | None = None, registry=None):
    """A FastAPI app serving ``server`` (started by the caller, who also closes it).

    Args:
        server: an :class:`~ann_kernels.inference.EarlyExitServer`, or an LM's
            :class:`~ann_kernels.generation.GenerationServer`.
        model_name: the Open Inference Protocol's model name (``/v2/models/{model_name}``).
        sample_shape: one sample's shape (default: the server's, given to it or learnt from
            its first request).
        max_body_bytes: larger request bodies (also once decompressed) get 413.
        info: extra fields for ``/healthz`` (e.g. the checkpoint).
        protocols: names from :data:`PROTOCOLS` (default: ``predict`` and ``oip`` for a
            classifier, ``openai`` for an LM).
        metrics: serve ``/metrics`` (None: when prometheus_client is installed).
        registry: the ``prometheus_client.CollectorRegistry`` to use (default: a new one).
    """
    fastapi, _ = require_serve_extra()
    lm = is_generation_server(server)
    allowed = LM_PROTOCOLS if lm else DEFAULT_PROTOCOLS
    if protocols is None:
        protocols = allowed
    unknown = [p for p in protocols if p not in allowed]
    if unknown or not protocols:
        kind = "an LM's GenerationServer" if lm else "an EarlyExitServer"
        raise ValueError(f"protocols: expected names from {list(allowed)} for {kind}, got {list(protocols)!r}")
    model = describe_server(server, model_name, sample_shape, info)
    serve_metrics = None
    if metrics is None or metrics:
        from ann_kernels.serve.metrics import ServeMetrics, require_prometheus

        try:
            require_prometheus()
        except ImportError:
            if metrics:
                raise
        else:
            if lm:
                from ann_kernels.serve.lm_metrics import GenerationMetrics

                serve_metrics = GenerationMetrics(server, model_name, registry=registry)
            else:
                serve_metrics = ServeMetrics(server, model_name, registry=registry)
    state = ServingState(server, model, max_body_bytes=max_body_bytes, metrics=serve_metrics)
    app = fastapi.FastAPI(title="ann_kernels early-exit server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    (add_openai_error_handlers if lm else add_error_handlers)(app)
    for name in protocols:
        PROTOCOLS[name](app, state)
    if serve_metrics is not None:
        from ann_kernels.serve.metrics import add_metrics_routes

        add_metrics_routes(app, serve_metrics)
    return app
