"""Our own JSON protocol (the first HTTP front of ``ann-kernels serve``), unchanged:

- ``POST /predict`` with ``{"inputs": [[...], ...], "deadline_s": 0.05}`` (inputs: a nested
  list shaped [n, *sample_shape], n >= 1; ``deadline_s`` optional) ->
  ``{"prediction": [n ints], "exit_index": [n ints], "confidence": [n floats],
  "samples_per_exit": [K ints], "mean_flops": float, "latency_s": float,
  "deadline_exit": int | null}``.
- ``GET /stats`` -> :meth:`~ann_kernels.inference.ServerStats.as_dict`.
- ``GET /healthz`` -> ``{"status": "ok", ...}`` (503 ``{"status": "closing"}`` once the server
  drains or closes).

Errors: a body over ``max_body_bytes`` -> 413; not JSON -> 400; JSON of the wrong structure
or inputs of the wrong shape / type -> 422; draining -> 503; the model failing on a request
-> 500; each with ``{"error": "..."}`` naming the problem.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' parameter
# annotations (fastapi.Request, imported lazily) at route creation.
import json
import math
import time

import torch

from ann_kernels.serve.state import ProtocolError, ServingState

__all__ = ["add_predict_routes", "decode_predict_body", "encode_predict_result"]

PROTOCOL = "predict"


def decode_predict_body(body: bytes, state: ServingState):
    """(x [n, *sample_shape] in the model's dtype and device, deadline_s or None) from a /predict
    body; ProtocolError 400 / 422 naming the field otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"body: not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ProtocolError(422, 'body: expected a JSON object {"inputs": [[...], ...], "deadline_s": optional}')
    unknown = sorted(set(payload) - {"inputs", "deadline_s"})
    if unknown:
        raise ProtocolError(422, f"body: unknown fields {unknown}; expected 'inputs' and optionally 'deadline_s'")
    deadline_s = payload.get("deadline_s")
    if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))):
        raise ProtocolError(422, f"deadline_s: expected seconds (a number) or null, got {deadline_s!r}")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(422, "inputs: expected a non-empty nested list [n, *sample_shape]")
    try:
        x = torch.tensor(inputs, dtype=state.model.dtype, device=state.model.device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProtocolError(
            422, f"inputs: expected a rectangular nested list of numbers [n, *sample_shape] ({exc})") from None
    return x, deadline_s


def encode_predict_result(result) -> dict:
    """The /predict answer for an :class:`~ann_kernels.inference.EarlyExitResult`."""
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


def add_predict_routes(app, state: ServingState) -> None:
    """Register ``POST /predict``, ``GET /stats`` and ``GET /healthz`` on the FastAPI ``app``."""
    import fastapi
    from fastapi.responses import JSONResponse

    @app.get("/healthz")
    async def healthz():
        if not state.ready():
            return JSONResponse({"status": "closing"}, status_code=503)
        shape = state.model.sample_shape or state.current_sample_shape()
        return {"status": "ok", "num_exits": state.model.num_exits,
                "sample_shape": list(shape) if shape else None, **state.model.extra}

    @app.get("/stats")
    async def stats():
        return state.server.stats().as_dict()

    @app.post("/predict")
    async def predict(request: fastapi.Request):
        started = time.perf_counter()
        result = None
        try:
            x, deadline_s = decode_predict_body(await state.read_body(request), state)
            result = await state.wait(state.submit(x, deadline_s))
            response = JSONResponse(encode_predict_result(result))
        except ProtocolError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status)
        state.finish(PROTOCOL, response.status_code, started, result)
        return response
