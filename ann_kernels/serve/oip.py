"""Open Inference Protocol v2 (KServe V2 / NVIDIA Triton's HTTP API) routes, what
``tritonclient.http`` and KServe's ``InferenceRESTClient`` call:

- ``GET /v2/health/live`` -> 200 ``{"live": true}``; ``GET /v2/health/ready`` -> 200
  ``{"ready": true}``, 503 ``{"ready": false}`` while draining (SIGTERM) or closed;
- ``GET /v2`` -> ``{"name", "version", "extensions": EXTENSIONS}``;
- ``GET /v2/models/{name}[/versions/1]`` -> metadata: input ``input`` ``[-1, *sample_shape]``
  of the model's dtype (FP32), outputs ``prediction`` INT64 [n], ``exit_index`` INT64 [n],
  ``confidence`` FP32 [n];
- ``GET /v2/models/{name}[/versions/1]/ready``;
- ``GET /v2/models/{name}[/versions/1]/config`` (Triton's model configuration extension) -> a
  Triton-style model config: ``max_batch_size`` (the server's rows per stage run), ``input`` /
  ``output`` with ``data_type`` (``TYPE_FP32`` / ``TYPE_INT64``) and per-sample ``dims``
  (outputs ``[1]`` reshaped to ``[]``: one scalar per row), ``dynamic_batching``;
- ``GET /v2/models[/{name}[/versions/1]]/stats`` (Triton's statistics extension) ->
  ``{"model_stats": [...]}`` from :class:`~ann_kernels.serve.state.InferenceTotals` (requests
  of every protocol) and the server's stage runs (``execution_count``);
- ``POST /v2/models/{name}[/versions/1]/infer``: JSON tensors or the binary tensor data
  extension (:mod:`.oip_tensors`); ``id`` echoed; our ``deadline_s`` in the request's
  ``parameters``; the answer's ``parameters`` carry ``mean_flops`` (and ``deadline_exit`` when a
  deadline cut the request short).

Errors are ``{"error": "..."}``: 400 malformed body (the message names the field), 404 an
unknown model or version, 413 too large, 422 input the server rejects, 503 draining, 500 the
model failed. The model's name is ``--model-name`` (default: the run directory's name).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' parameter
# annotations (fastapi.Request, imported lazily) at route creation.
import time

from ann_kernels.serve.oip_tensors import (
    INPUT_NAME,
    OUTPUTS,
    decode_infer_request,
    encode_infer_response,
    oip_datatype,
)
from ann_kernels.serve.state import ProtocolError, ServingState

__all__ = ["EXTENSIONS", "MODEL_VERSION", "add_oip_routes", "model_config", "model_metadata", "model_statistics",
           "server_metadata"]

PROTOCOL = "oip"
MODEL_VERSION = "1"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
# Open Inference Protocol datatype -> Triton model-config data_type ("FP32" -> "TYPE_FP32")
CONFIG_TYPE_PREFIX = "TYPE_"


def server_metadata() -> dict:
    from ann_kernels import __version__

    return {"name": "ann_kernels", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(state: ServingState) -> dict:
    shape = state.current_sample_shape()
    return {
        "name": state.model.name,
        "versions": [MODEL_VERSION],
        "platform": "ann_kernels_early_exit",
        "inputs": [{"name": INPUT_NAME, "datatype": oip_datatype(state.model.dtype),
                    "shape": [-1, *(shape if shape is not None else [-1])]}],
        "outputs": [{"name": name, "datatype": datatype, "shape": [-1]} for name, datatype in OUTPUTS.items()],
    }


def model_config(state: ServingState) -> dict:
    """Triton's model configuration (``model_config.proto`` as JSON) of the served model, what
    ``tritonclient.http.InferenceServerClient.get_model_config`` and perf_analyzer read.

    ``dims`` leave out the batch dimension (``max_batch_size`` > 0): the input's are one
    sample's shape (``[-1]`` until the server learns it), each output is one scalar per row
    (``dims [1]`` with ``reshape {"shape": []}``, Triton's spelling of a per-row scalar)."""
    shape = state.current_sample_shape()
    server = state.server
    return {
        "name": state.model.name,
        "platform": "ann_kernels_early_exit",
        "backend": "ann_kernels",
        "version_policy": {"specific": {"versions": [int(MODEL_VERSION)]}},
        "max_batch_size": int(server.max_batch_size),
        "input": [{"name": INPUT_NAME, "data_type": CONFIG_TYPE_PREFIX + oip_datatype(state.model.dtype),
                   "format": "FORMAT_NONE", "dims": list(shape) if shape is not None else [-1]}],
        "output": [{"name": name, "data_type": CONFIG_TYPE_PREFIX + datatype, "dims": [1],
                    "reshape": {"shape": []}} for name, datatype in OUTPUTS.items()],
        "dynamic_batching": {"max_queue_delay_microseconds": int(round(server.max_wait_s * 1e6))},
        "instance_group": [{"count": 1, "kind": "KIND_CPU" if state.model.device.type == "cpu" else "KIND_GPU"}],
        "parameters": {"num_exits": {"string_value": str(state.model.num_exits)}},
    }


def model_statistics(state: ServingState) -> dict:
    """Triton's statistics extension answer for the served model: ``inference_count`` (rows
    answered), ``execution_count`` (model executions: stage-0 runs of the stage batcher, each
    carrying the rows of one or more requests), ``inference_stats`` ``success`` / ``fail`` /
    ``queue`` as ``{"count", "ns"}`` (:class:`~ann_kernels.serve.state.InferenceTotals`).
    ``compute_*`` and ``batch_stats`` are not measured per request here and are left out."""
    totals = state.totals
    stage_runs = state.server.stats().stage_runs
    return {"model_stats": [{
        "name": state.model.name,
        "version": MODEL_VERSION,
        "last_inference": totals.last_inference_ms,
        "inference_count": totals.rows,
        "execution_count": int(stage_runs[0]) if stage_runs else 0,
        "inference_stats": {
            "success": {"count": totals.success_count, "ns": totals.success_ns},
            "fail": {"count": totals.fail_count, "ns": totals.fail_ns},
            "queue": {"count": totals.queue_count, "ns": totals.queue_ns},
        },
    }]}


def add_oip_routes(app, state: ServingState) -> None:
    """Register the ``/v2`` routes on the FastAPI ``app``."""
    import fastapi
    from fastapi.responses import JSONResponse, Response

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    def check_model(name: str, version: str | None):
        if name != state.model.name:
            raise ProtocolError(404, f"model {name!r}: not served here (this server serves {state.model.name!r})")
        if version is not None and version != MODEL_VERSION:
            raise ProtocolError(404, f"model {name!r} version {version!r}: not served here (versions: "
                                     f"[{MODEL_VERSION!r}])")

    @app.get("/v2")
    async def metadata():
        return server_metadata()

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state.ready()}, status_code=200 if state.ready() else 503)

    async def get_model(name: str, version: str | None = None):
        try:
            check_model(name, version)
        except ProtocolError as exc:
            return error(exc.status, exc.message)
        return model_metadata(state)

    async def model_ready(name: str, version: str | None = None):
        try:
            check_model(name, version)
        except ProtocolError as exc:
            return error(exc.status, exc.message)
        return JSONResponse({"name": name, "ready": state.ready()}, status_code=200 if state.ready() else 503)

    async def infer(request: fastapi.Request, name: str, version: str | None = None):
        started = time.perf_counter()
        result = None
        try:
            check_model(name, version)
            body = await state.read_body(request)
            decoded = decode_infer_request(body, request.headers.get(HEADER_LENGTH), state.model,
                                           state.current_sample_shape())
            result = await state.wait(state.submit(decoded.x, decoded.deadline_s))
            content, header_length = encode_infer_response(result, decoded, state.model.name)
            if header_length is None:
                response = Response(content, media_type="application/json")
            else:
                response = Response(content, media_type="application/octet-stream",
                                    headers={HEADER_LENGTH: str(header_length)})
        except ProtocolError as exc:
            response = error(exc.status, exc.message)
        state.finish(PROTOCOL, response.status_code, started, result)
        return response

    async def config(name: str, version: str | None = None):
        try:
            check_model(name, version)
        except ProtocolError as exc:
            return error(exc.status, exc.message)
        return model_config(state)

    async def stats(name: str | None = None, version: str | None = None):
        try:
            if name is not None:
                check_model(name, version)
        except ProtocolError as exc:
            return error(exc.status, exc.message)
        return model_statistics(state)

    app.add_api_route("/v2/models/stats", stats, methods=["GET"])  # all models (before {name})
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix + "/config", config, methods=["GET"])
        app.add_api_route(prefix + "/stats", stats, methods=["GET"])
        app.add_api_route(prefix, get_model, methods=["GET"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/infer", infer, methods=["POST"])
