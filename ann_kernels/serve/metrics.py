"""Prometheus ``GET /metrics`` (``prometheus_client``, extra ``[serve]``), one dedicated
``CollectorRegistry`` per app (two apps in one process never share or collide), every series
labelled ``model``:

| series | type | labels | what |
|---|---|---|---|
| ``ann_kernels_request_duration_seconds`` | histogram | protocol | arrival of the request to its answer, every answered request |
| ``ann_kernels_request_queue_seconds`` | histogram | | seconds a request's rows waited in stage queues (successful requests) |
| ``ann_kernels_requests_total`` | counter | protocol, outcome | answered requests: ``success`` (2xx), ``invalid`` (4xx but 503), ``unavailable`` (503: draining / closed), ``error`` (5xx) |
| ``ann_kernels_exit_rows_total`` | counter | exit | rows of completed requests that left at each exit |
| ``ann_kernels_mean_flops_per_row`` / ``ann_kernels_full_flops_per_row`` | gauge | | mean cost per completed row / the full network's (their ratio: the cost saved) |
| ``ann_kernels_stage_batch_rows`` | histogram | stage | rows per stage run (the batches the stage batcher formed) |
| ``ann_kernels_stage_duration_seconds`` | histogram | stage | seconds per stage run (stage + head + exit op) |
| ``ann_kernels_stage_runs_total`` | counter | stage | stage runs |
| ``ann_kernels_requests_in_flight`` | gauge | | submitted requests not yet answered by the server |
| ``ann_kernels_queued_rows`` | gauge | stage | rows waiting in each stage's queue now |

protocol is ``predict`` (``POST /predict``) or ``oip`` (``POST /v2/models/{name}/infer``).
Exit and stage numbers are 0-based, as ``exit_index`` in the answers.
"""

from __future__ import annotations

__all__ = ["LATENCY_BUCKETS", "ServeMetrics", "add_metrics_routes", "require_prometheus"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROTOCOLS = ("predict", "oip")
OUTCOMES = ("success", "invalid", "unavailable", "error")


def require_prometheus():
    """The ``prometheus_client`` module, or ImportError saying how to install it."""
    try:
        import prometheus_client
    except ImportError as error:
        raise ImportError("serve: /metrics needs prometheus_client: pip install 'ann_kernels[serve]'") from error
    return prometheus_client


def outcome_of(status: int) -> str:
    """The ``outcome`` label of an HTTP status."""
    if status < 400:
        return "success"
    if status == 503:
        return "unavailable"
    return "invalid" if status < 500 else "error"


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(float(b))
        b *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


class ServeMetrics:
    """The metrics of one served model (module docstring). ``server``: an
    :class:`~ann_kernels.inference.EarlyExitServer`; its stage runs are observed through its
    stage listener, its counters read at scrape time. ``registry``: default a new one."""

    def __init__(self, server, model_name: str, *, registry=None) -> None:
        prometheus_client = require_prometheus()
        from prometheus_client import Counter, Histogram

        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.server = server
        self.model_name = model_name
        r, m = self.registry, model_name
        self._request_seconds = Histogram(
            "ann_kernels_request_duration_seconds", "Seconds from a request's arrival to its answer",
            ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self._queue_seconds = Histogram(
            "ann_kernels_request_queue_seconds", "Seconds a request's rows waited in stage queues",
            ["model"], buckets=LATENCY_BUCKETS, registry=r).labels(m)
        self._requests = Counter("ann_kernels_requests", "Answered requests by outcome",
                                 ["model", "protocol", "outcome"], registry=r)
        batch = _batch_buckets(getattr(server, "max_batch_size", 256))
        stage_rows = Histogram("ann_kernels_stage_batch_rows", "Rows per stage run", ["model", "stage"],
                               buckets=batch, registry=r)
        stage_seconds = Histogram("ann_kernels_stage_duration_seconds", "Seconds per stage run (stage, head, exit op)",
                                  ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        # children bound once: no label lookup per request / stage run
        self._latency = {p: self._request_seconds.labels(m, p) for p in PROTOCOLS}
        self._outcome = {(p, o): self._requests.labels(m, p, o) for p in PROTOCOLS for o in OUTCOMES}
        self._stage_rows = [stage_rows.labels(m, str(k)) for k in range(server.num_exits)]
        self._stage_seconds = [stage_seconds.labels(m, str(k)) for k in range(server.num_exits)]
        r.register(_ServerCollector(server, m))
        server.add_stage_listener(self._on_stage)

    def _on_stage(self, stage: int, batch_rows: int, exited_rows: int, seconds: float) -> None:
        """Stage listener (the server's worker thread; prometheus_client is thread-safe)."""
        self._stage_rows[stage].observe(batch_rows)
        self._stage_seconds[stage].observe(seconds)

    def observe_request(self, protocol: str, status: int, seconds: float, result=None) -> None:
        """One answered request: its latency, outcome and (a result) queue time."""
        self._latency[protocol].observe(seconds)
        self._outcome[protocol, outcome_of(status)].inc()
        if result is not None:
            self._queue_seconds.observe(result.queue_s)

    def exposition(self) -> bytes:
        """The text exposition format of every series."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _ServerCollector:
    """Scrape-time series from the server's own counters (exact, and no work per request)."""

    def __init__(self, server, model_name: str) -> None:
        self.server, self.model_name = server, model_name

    def describe(self):
        return []  # collect() is cheap but needs a live server: no describe-by-collect at register

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m, server = self.model_name, self.server
        stats = server.stats()
        rows = CounterMetricFamily("ann_kernels_exit_rows", "Rows of completed requests per exit",
                                   labels=["model", "exit"])
        for k, count in enumerate(stats.rows_per_exit):
            rows.add_metric([m, str(k)], count)
        yield rows
        for name, text, value in (("ann_kernels_mean_flops_per_row", "Mean FLOPs per completed row", stats.mean_flops),
                                  ("ann_kernels_full_flops_per_row", "FLOPs of a row at full depth", stats.full_flops)):
            gauge = GaugeMetricFamily(name, text, labels=["model"])
            gauge.add_metric([m], value)
            yield gauge
        runs = CounterMetricFamily("ann_kernels_stage_runs", "Stage runs", labels=["model", "stage"])
        for k, count in enumerate(stats.stage_runs):
            runs.add_metric([m, str(k)], count)
        yield runs
        in_flight = GaugeMetricFamily("ann_kernels_requests_in_flight",
                                      "Submitted requests not yet answered by the server", labels=["model"])
        in_flight.add_metric([m], stats.requests_in_flight)
        yield in_flight
        queued = GaugeMetricFamily("ann_kernels_queued_rows", "Rows waiting per stage queue", labels=["model", "stage"])
        for k, count in enumerate(stats.queue_depths):
            queued.add_metric([m, str(k)], count)
        yield queued


def add_metrics_routes(app, metrics: ServeMetrics) -> None:
    """Register ``GET /metrics`` on the FastAPI ``app``."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    @app.get("/metrics")
    async def scrape():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
