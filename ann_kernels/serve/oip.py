"""Open Inference Protocol v2 (KServe V2 / NVIDIA Triton's HTTP API) routes, what
``tritonclient.http`` and KServe's ``InferenceRESTClient`` call:

- ``GET /v2/health/live`` -> 200 ``{"live": true}``; ``GET /v2/health/ready`` -> 200
  ``{"ready": true}``, 503 ``{"ready": false}`` while draining (SIGTERM) or closed;
- ``GET /v2`` -> ``{"name", "version", "extensions": ["binary_tensor_data"]}``;
- ``GET /v2/models/{name}[/versions/1]`` -> metadata: input ``input`` ``[-1, *sample_shape]``
  of the model's dtype (FP32), outputs ``prediction`` INT64 [n], ``exit_index`` INT64 [n],
  ``confidence`` FP32 [n];
- ``GET /v2/models/{name}[/versions/1]/ready``;
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

__all__ = ["MODEL_VERSION", "add_oip_routes", "model_metadata", "server_metadata"]

PROTOCOL = "oip"
MODEL_VERSION = "1"
HEADER_LENGTH = "Inference-Header-Content-Length"


def server_metadata() -> dict:
    from ann_kernels import __version__

    return {"name": "ann_kernels", "version": __version__, "extensions": ["binary_tensor_data"]}


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

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, get_model, methods=["GET"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/infer", infer, methods=["POST"])
