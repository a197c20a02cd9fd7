"""HTTP serving (optional extra ``pip install 'ann_kernels[serve]'``: FastAPI, uvicorn,
prometheus_client; Ray Serve replicas need ``[ray]``).

One FastAPI app per served model with a module per protocol (:mod:`.app`): our JSON
``/predict`` (:mod:`.predict`), the Open Inference Protocol v2 with binary tensors
(:mod:`.oip`, :mod:`.oip_tensors`), Prometheus ``/metrics`` (:mod:`.metrics`); for an LM's
``GenerationServer`` the OpenAI ``/v1/completions`` (:mod:`.openai_api`, :mod:`.openai_schema`,
:mod:`.lm_metrics`, ``ann-kernels serve`` on an LM checkpoint: :mod:`.lm_command`); the drain on
SIGTERM and a background-thread front (:mod:`.runner`); replicas on Ray Serve
(:mod:`.ray_app`). Nothing here imports FastAPI, uvicorn or Ray until it is used.
See ``docs/serving.md`` and ``docs/serving_lm.md``.
"""

from ann_kernels.serve.app import DEFAULT_MAX_BODY_BYTES, PROTOCOLS, create_app, require_serve_extra

__all__ = ["DEFAULT_MAX_BODY_BYTES", "PROTOCOLS", "HttpFront", "create_app", "require_serve_extra", "start_http"]


def __getattr__(name: str):
    if name in ("HttpFront", "start_http", "DrainingServer"):  # imports uvicorn
        from ann_kernels.serve import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'ann_kernels.serve' has no attribute {name!r}")
