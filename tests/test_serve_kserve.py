"""KServe's V2 REST client through its documented import (``from kserve import
InferenceRESTClient``) against our Open Inference Protocol routes over loopback: health and
readiness, ``infer`` with JSON tensors and with the binary tensor data extension (in and
out), every answer equal to ``EarlyExitEngine.predict`` row by row, the request id echoed,
and a malformed request answered 400 with a message naming the field.

kserve 0.21 needs ``protobuf<7``; where it is missing or cannot be imported (protobuf 7
installed), the module is skipped with the reason (docs/serving.md, "KServe's client")."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.early_exit_helpers import inputs, mlp_http_front
from tests.utils import requires_ext

try:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
except Exception as error:  # noqa: BLE001  ImportError, or protobuf's version check under protobuf >= 7
    pytest.skip(f"kserve's client is not importable ({type(error).__name__}: {error}); it needs "
                f"pip install kserve 'protobuf<7' (docs/serving.md)", allow_module_level=True)
httpx = pytest.importorskip("httpx", reason="httpx not installed (kserve's REST client uses it)")
pytest.importorskip("fastapi", reason="fastapi / uvicorn not installed (pip install 'ann_kernels[serve]')")

pytestmark = [requires_ext, pytest.mark.usefixtures("one_thread")]

THRESHOLDS = [0.4, 0.5, 0.6, 0.0]
MODEL = "mlp"


@pytest.fixture(scope="module")
def front():
    with mlp_http_front(THRESHOLDS, MODEL) as (http_front, engine, _):
        yield SimpleNamespace(url=http_front.url, engine=engine)


def call(method: str, *args, **kwargs):
    """``await InferenceRESTClient(v2).method(*args, **kwargs)`` on a fresh client and loop."""
    async def run():
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(run())


def test_health_and_readiness_through_kserve(front):
    assert call("is_server_live", front.url) is True
    assert call("is_server_ready", front.url) is True
    assert call("is_model_ready", front.url, MODEL) is True
    assert call("is_model_ready", front.url, "other") is False


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("rows", [1, 7])
def test_kserve_infer_equals_predict_row_by_row(front, binary, rows):
    x = inputs(rows, seed=300 + rows).numpy()
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    request = InferRequest(MODEL, [tensor], request_id=f"req-{rows}",
                           parameters={"binary_data_output": True} if binary else None)
    response = call("infer", front.url, request, model_name=MODEL)
    assert response.id == f"req-{rows}"
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    want = front.engine.predict(torch.from_numpy(x), thresholds=THRESHOLDS)
    assert outputs["prediction"].dtype == np.int64 and outputs["prediction"].tolist() == want.prediction.tolist()
    assert outputs["exit_index"].tolist() == want.exit_index.tolist()
    assert outputs["confidence"].dtype == np.float32
    assert outputs["confidence"] == pytest.approx(want.confidence.numpy(), abs=1e-5)


def test_kserve_malformed_request_gets_400_naming_the_field(front):
    tensor = InferInput("input", [2, 16], "INT32")
    tensor.set_data_from_numpy(np.zeros((2, 16), dtype=np.int32), binary_data=False)
    with pytest.raises(httpx.HTTPStatusError) as caught:
        call("infer", front.url, InferRequest(MODEL, [tensor]), model_name=MODEL)
    assert caught.value.response.status_code == 400
    assert "datatype" in str(caught.value)
