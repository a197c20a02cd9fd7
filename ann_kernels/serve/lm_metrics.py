"""Prometheus series of an LM app (a :class:`~ann_kernels.generation.GenerationServer`
behind :mod:`.openai_api`), in :mod:`.metrics`'s style: one ``CollectorRegistry`` per app,
every series labelled ``model``. Names follow vLLM's (``vllm:time_to_first_token_seconds``,
``vllm/v1/metrics/loggers.py``, ``PrometheusStatLogger``) with our prefix ``ann_kernels:``:

| series | type | more labels | what |
|---|---|---|---|
| ``ann_kernels:time_to_first_token_seconds`` | histogram | | submit to the first generated token |
| ``ann_kernels:inter_token_latency_seconds`` | histogram | | one per token after the first: the gap between its decode step and the previous one, over the tokens that step gave |
| ``ann_kernels:request_queue_time_seconds`` | histogram | | submit to prefill |
| ``ann_kernels:e2e_request_latency_seconds`` | histogram | | submit to the last token |
| ``ann_kernels:request_success_total`` | counter | finished_reason | finished requests: ``eos``, ``stop``, ``length``, ``deadline``, ``cancelled`` |
| ``ann_kernels:prompt_tokens_total`` / ``ann_kernels:generation_tokens_total`` | counter | | prefilled / generated tokens |
| ``ann_kernels:num_requests_running`` / ``ann_kernels:num_requests_waiting`` | gauge | | rows in the batch / queued requests |
| ``ann_kernels:generation_tokens_per_second`` | gauge | | generated tokens per second the worker spent in prefill or decode |
| ``ann_kernels:exit_tokens_total`` | counter | exit | generated tokens per exit (0-based) |
| ``ann_kernels:mean_exit`` | gauge | | mean exit of the generated tokens (NaN before any) |
| ``ann_kernels:spec_decode_num_draft_tokens_total`` / ``..._num_accepted_tokens_total`` | counter | | self-speculative drafts / accepted drafts |
| ``ann_kernels:spec_decode_acceptance_rate`` | gauge | | their ratio (NaN without drafts) |
| ``ann_kernels_request_duration_seconds`` / ``ann_kernels_requests_total`` | histogram / counter | protocol, outcome | HTTP requests as in :mod:`.metrics` (protocol ``openai``; outcome ``cancelled``: the client left mid-stream) |

The latency histograms are observed when a request finishes (the server's listener); the
token, exit and request-count series are read from ``GenerationServer.stats()`` at scrape time.
"""

from __future__ import annotations

from ann_kernels.serve.metrics import LATENCY_BUCKETS, outcome_of, require_prometheus

__all__ = ["GenerationMetrics", "ITL_BUCKETS"]

ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
PREFIX = "ann_kernels:"


class GenerationMetrics:
    """The metrics of one served LM (module docstring)."""

    def __init__(self, server, model_name: str, *, registry=None) -> None:
        prometheus_client = require_prometheus()
        from prometheus_client import Counter, Histogram

        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.server, self.model_name = server, model_name
        r, m = self.registry, model_name

        def hist(name, text, buckets):
            return Histogram(PREFIX + name, text, ["model"], buckets=buckets, registry=r).labels(m)

        self._ttft = hist("time_to_first_token_seconds", "Seconds from submit to the first token", LATENCY_BUCKETS)
        self._itl = hist("inter_token_latency_seconds", "Seconds between generated tokens", ITL_BUCKETS)
        self._queue = hist("request_queue_time_seconds", "Seconds from submit to prefill", LATENCY_BUCKETS)
        self._e2e = hist("e2e_request_latency_seconds", "Seconds from submit to the last token", LATENCY_BUCKETS)
        self._latency = Histogram("ann_kernels_request_duration_seconds", "Seconds from a request's arrival to its "
                                  "answer", ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r).labels(m, "openai")
        self._requests = Counter("ann_kernels_requests", "Answered HTTP requests by outcome",
                                 ["model", "protocol", "outcome"], registry=r)
        r.register(_GenerationCollector(server, m))
        server.add_listener(self._on_finished)

    def _on_finished(self, completion) -> None:
        """The server's listener (its worker thread; prometheus_client is thread-safe)."""
        self._queue.observe(completion.queue_s)
        self._e2e.observe(completion.e2e_s)
        if completion.ttft_s is not None:
            self._ttft.observe(completion.ttft_s)
        for gap in completion.inter_token_s:
            self._itl.observe(gap)

    def observe_request(self, protocol: str, status: int, seconds: float, result=None) -> None:
        """One answered HTTP request (``ServingState.finish``)."""
        self._latency.observe(seconds)
        outcome = "cancelled" if status == 499 else outcome_of(status)
        self._requests.labels(self.model_name, protocol, outcome).inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _GenerationCollector:
    """Scrape-time series from ``GenerationServer.stats()``."""

    def __init__(self, server, model_name: str) -> None:
        self.server, self.model_name = server, model_name

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m, s = self.model_name, self.server.stats()

        def counter(name, text, value, labels=(), values=()):
            family = CounterMetricFamily(PREFIX + name, text, labels=["model", *labels])
            family.add_metric([m, *values], value)
            return family

        def gauge(name, text, value):
            family = GaugeMetricFamily(PREFIX + name, text, labels=["model"])
            family.add_metric([m], value)
            return family

        success = CounterMetricFamily(PREFIX + "request_success", "Finished requests by reason",
                                      labels=["model", "finished_reason"])
        for reason, count in s.requests_finished.items():
            success.add_metric([m, reason], count)
        yield success
        yield counter("prompt_tokens", "Prefilled prompt tokens", s.prompt_tokens)
        yield counter("generation_tokens", "Generated tokens", s.generated_tokens)
        yield gauge("num_requests_running", "Requests in the running batch", s.requests_running)
        yield gauge("num_requests_waiting", "Requests waiting for a row", s.requests_waiting)
        yield gauge("generation_tokens_per_second", "Generated tokens per busy second", s.tokens_per_s)
        exits = CounterMetricFamily(PREFIX + "exit_tokens", "Generated tokens per exit", labels=["model", "exit"])
        for k, count in enumerate(s.exit_counts):
            exits.add_metric([m, str(k)], count)
        yield exits
        yield gauge("mean_exit", "Mean exit (0-based) of the generated tokens", s.mean_exit)
        yield counter("spec_decode_num_draft_tokens", "Self-speculative draft tokens", s.drafted_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Accepted self-speculative draft tokens", s.accepted_tokens)
        yield gauge("spec_decode_acceptance_rate", "Accepted / drafted tokens", s.acceptance_rate)
