"""Open Inference Protocol (KServe V2) tensors: the request decoder (JSON tensors, nested or
flat, and the binary tensor data extension) and the response encoder.

Follows ``kserve/open-inference-protocol`` ``specification/protocol/inference_rest.md`` and
Triton's ``docs/protocol/extension_binary_data.md`` (what ``tritonclient.http`` sends: JSON
header first, then each binary input's raw little-endian row-major bytes in the order of
``inputs``; the header's length in ``Inference-Header-Content-Length``; per input
``parameters.binary_data_size``; binary outputs when the request sets
``parameters.binary_data_output`` or an output's ``parameters.binary_data``).

Binary data is read and written in the host's byte order, which is the protocol's
little-endian on every platform torch ships CPU wheels for except s390x (not supported here).

Every malformed body raises :class:`~ann_kernels.serve.state.ProtocolError` 400 with a
message that names the field (``inputs[0].datatype``, ``inputs[0].shape``,
``inputs[0].parameters.binary_data_size``, ...) and the bad value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ann_kernels.serve.state import ProtocolError

__all__ = ["INPUT_NAME", "OIP_DATATYPES", "OUTPUTS", "InferRequest", "decode_infer_request",
           "encode_infer_response", "oip_datatype"]

INPUT_NAME = "input"
# Open Inference Protocol datatype -> torch dtype (BYTES has none: strings are not model inputs here)
OIP_DATATYPES = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32,
    "FP64": torch.float64, "BYTES": None,
}
# the outputs of every inference: name -> datatype
OUTPUTS = {"prediction": "INT64", "exit_index": "INT64", "confidence": "FP32"}


def oip_datatype(dtype: torch.dtype) -> str:
    """The protocol's name of a torch dtype (``torch.float32`` -> ``"FP32"``)."""
    for name, value in OIP_DATATYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype: {dtype} has no Open Inference Protocol datatype")


@dataclass
class InferRequest:
    """A decoded ``infer`` body: ``x`` [n, *sample_shape], ``deadline_s``, the ``id`` to echo
    (None: absent) and the outputs to return as ``[(name, binary)]`` in order."""

    x: torch.Tensor
    deadline_s: float | None
    id: str | None
    outputs: list[tuple[str, bool]]


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _flag(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{field}: expected true or false, got {value!r}")
    return value


def _parameters(entry: dict, field: str) -> dict:
    parameters = entry.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise _bad(f"{field}.parameters: expected a JSON object, got {parameters!r}")
    return parameters


def _check_shape(shape, field: str, sample_shape) -> list[int]:
    if not isinstance(shape, list) or not shape or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        raise _bad(f"{field}.shape: expected a list of ints [n, *sample_shape], got {shape!r}")
    if shape[0] < 1 or any(s < 0 for s in shape):
        raise _bad(f"{field}.shape: expected [n, *sample_shape] with n >= 1, got {shape}")
    if sample_shape is not None and tuple(shape[1:]) != tuple(sample_shape):
        raise _bad(f"{field}.shape: expected [n, {', '.join(map(str, sample_shape))}] (the model's input "
                   f"[-1, {', '.join(map(str, sample_shape))}]), got {shape}")
    return shape


def _split_header(body: bytearray, header_length) -> tuple[int, int]:
    """(JSON length, binary length) from the Inference-Header-Content-Length header."""
    if header_length is None:
        return len(body), 0
    try:
        length = int(header_length)
    except ValueError:
        raise _bad(f"Inference-Header-Content-Length: expected an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise _bad(f"Inference-Header-Content-Length: expected 1..{len(body)} (the body's length), got {length}")
    return length, len(body) - length


def _decode_input(entry, body: bytearray, offset: int, end: int, model, sample_shape) -> tuple[torch.Tensor, int]:
    """One input tensor (and the binary offset after it)."""
    field = "inputs[0]"
    if not isinstance(entry, dict):
        raise _bad(f"{field}: expected a JSON object {{name, shape, datatype, data}}, got {entry!r}")
    if entry.get("name") != INPUT_NAME:
        raise _bad(f"{field}.name: expected {INPUT_NAME!r} (the model's input), got {entry.get('name')!r}")
    datatype, expected = entry.get("datatype"), oip_datatype(model.dtype)
    if datatype not in OIP_DATATYPES:
        raise _bad(f"{field}.datatype: {datatype!r} is not an Open Inference Protocol datatype "
                   f"({', '.join(OIP_DATATYPES)})")
    if datatype != expected:
        raise _bad(f"{field}.datatype: expected {expected!r} (the model's input), got {datatype!r}")
    shape = _check_shape(entry.get("shape"), field, sample_shape)
    count = math.prod(shape)
    parameters = _parameters(entry, field)
    size = parameters.get("binary_data_size")
    if size is None:  # JSON data, nested or flat, row-major
        if "data" not in entry:
            raise _bad(f"{field}.data: missing (and no parameters.binary_data_size for binary data)")
        try:
            x = torch.tensor(entry["data"], dtype=model.dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise _bad(f"{field}.data: expected a nested or flat list of numbers ({exc})") from None
        if x.numel() != count:
            raise _bad(f"{field}.data: {x.numel()} values do not match shape {shape} ({count} values)")
        return x.reshape(shape).to(model.device), offset
    if "data" in entry:
        raise _bad(f"{field}: has both data and parameters.binary_data_size (binary data); send one")
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    if isinstance(size, bool) or not isinstance(size, int) or size != count * itemsize:
        raise _bad(f"{field}.parameters.binary_data_size: expected {count * itemsize} bytes for shape {shape} "
                   f"of {datatype}, got {size!r}")
    if offset + size > end:
        raise _bad(f"{field}.parameters.binary_data_size: {size} bytes, but only {end - offset} bytes of binary "
                   "data follow the JSON header (Inference-Header-Content-Length)")
    if size == 0:
        x = torch.empty(shape, dtype=model.dtype)
    else:
        x = torch.frombuffer(body, dtype=model.dtype, count=count, offset=offset)
        if offset % itemsize:  # keep the model's inputs aligned
            x = x.clone()
    return x.reshape(shape).to(model.device), offset + size


def _decode_outputs(requested, binary_default: bool) -> list[tuple[str, bool]]:
    if requested is None:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(requested, list):
        raise _bad(f"outputs: expected a list of {{name, parameters}} objects, got {requested!r}")
    out = []
    for i, entry in enumerate(requested):
        field = f"outputs[{i}]"
        if not isinstance(entry, dict):
            raise _bad(f"{field}: expected a JSON object {{name, parameters}}, got {entry!r}")
        name = entry.get("name")
        if name not in OUTPUTS:
            raise _bad(f"{field}.name: expected one of {list(OUTPUTS)}, got {name!r}")
        parameters = _parameters(entry, field)
        if "classification" in parameters:
            raise _bad(f"{field}.parameters.classification: not supported (the outputs are already classes)")
        binary = parameters.get("binary_data", binary_default)
        out.append((name, _flag(binary, f"{field}.parameters.binary_data")))
    return out


def decode_infer_request(body: bytearray, header_length, model, sample_shape) -> InferRequest:
    """Decode an ``infer`` body (``body``: the whole request body, writable; ``header_length``:
    the Inference-Header-Content-Length header or None) for ``model`` (a
    :class:`~ann_kernels.serve.state.ModelDescription`) whose samples have ``sample_shape``
    (None: not known yet; any). Binary inputs become tensors over ``body`` without a copy."""
    json_length, binary_length = _split_header(body, header_length)
    try:
        payload = json.loads(bytes(memoryview(body)[:json_length]) if binary_length else body)
    except (ValueError, UnicodeDecodeError) as exc:
        hint = "" if header_length is not None else " (binary tensors need the Inference-Header-Content-Length header)"
        raise _bad(f"body: not valid JSON ({exc}){hint}") from None
    if not isinstance(payload, dict):
        raise _bad(f"body: expected a JSON object {{id, parameters, inputs, outputs}}, got {type(payload).__name__}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"id: expected a string, got {request_id!r}")
    parameters = _parameters(payload, "body")
    binary_default = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    deadline_s = parameters.get("deadline_s")
    if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                   or not 0 <= deadline_s < math.inf):
        raise _bad(f"parameters.deadline_s: expected finite seconds >= 0, got {deadline_s!r}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise _bad(f"inputs: expected a list with one tensor named {INPUT_NAME!r}, got "
                   f"{len(inputs) if isinstance(inputs, list) else repr(inputs)}"
                   f"{' tensors' if isinstance(inputs, list) else ''}")
    x, offset = _decode_input(inputs[0], body, json_length, len(body), model, sample_shape)
    if offset != len(body):
        raise _bad(f"Inference-Header-Content-Length: {len(body) - offset} bytes after the "
                   f"{json_length}-byte JSON header belong to no input (the inputs' binary_data_size add up to "
                   f"{offset - json_length} of {binary_length})")
    return InferRequest(x, deadline_s, request_id, _decode_outputs(payload.get("outputs"), binary_default))


def encode_infer_response(result, request: InferRequest, model_name: str) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of the answer to ``request``: the requested outputs,
    binary ones appended after the JSON header in output order."""
    n = result.prediction.shape[0]
    tensors = {"prediction": result.prediction, "exit_index": result.exit_index, "confidence": result.confidence}
    outputs, blobs = [], []
    for name, binary in request.outputs:
        tensor = tensors[name]
        entry = {"name": name, "datatype": OUTPUTS[name], "shape": [n]}
        if binary:
            blob = tensor.cpu().numpy().tobytes()  # little-endian on the hosts we run on
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            data = tensor.tolist()
            if name == "confidence" and any(c != c for c in data):  # NaN is not JSON
                data = [None if c != c else c for c in data]
            entry["data"] = data
        outputs.append(entry)
    stats = result.stats
    parameters = {"mean_flops": stats.mean_flops}
    if stats.deadline_exit is not None:
        parameters["deadline_exit"] = stats.deadline_exit
    answer = {"model_name": model_name, "model_version": "1", "outputs": outputs, "parameters": parameters}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
