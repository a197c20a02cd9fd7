"""The generation server's counters (:class:`ServerTotals`, written by its worker thread)
and their snapshot (:class:`GenerationServerStats`, ``GenerationServer.stats()``, the
``/stats`` answer and the scrape-time Prometheus series)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ann_kernels.generation.requests import FINISH_REASONS

__all__ = ["GenerationServerStats", "ServerTotals"]


@dataclass
class GenerationServerStats:
    """``requests_submitted`` / ``requests_failed`` / ``requests_rejected`` (busy);
    ``requests_finished``: per finish reason; ``requests_running`` (rows in the batch) /
    ``requests_waiting`` (queued); ``prompt_tokens`` / ``generated_tokens``; ``steps`` (decode
    steps); ``busy_s`` (seconds of prefill and decode); ``tokens_per_s`` (generated tokens per
    busy second); ``uptime_s``; ``exit_counts`` (generated tokens per exit); ``mean_exit``
    (0-based, NaN before any token); ``acceptance_rate`` (self-speculative drafts accepted /
    drafted, NaN without drafts)."""

    requests_submitted: int
    requests_failed: int
    requests_rejected: int
    requests_finished: dict
    requests_running: int
    requests_waiting: int
    prompt_tokens: int
    generated_tokens: int
    steps: int
    busy_s: float
    tokens_per_s: float
    uptime_s: float
    exit_counts: list
    mean_exit: float
    acceptance_rate: float
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    def as_dict(self) -> dict:
        """JSON-ready (NaN -> None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and value != value:
                out[key] = None
        return out


@dataclass
class ServerTotals:
    """Running totals (worker thread writes; readers take a snapshot)."""

    num_exits: int
    submitted: int = 0
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    started: float = field(default_factory=time.perf_counter)
    by_reason: dict = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    exit_counts: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.exit_counts:
            self.exit_counts = [0] * self.num_exits

    def finished(self, reason: str) -> None:
        self.by_reason[reason] += 1

    def snapshot(self, *, running: int, waiting: int) -> GenerationServerStats:
        counts = list(self.exit_counts)
        total = sum(counts)
        nan = float("nan")
        return GenerationServerStats(
            requests_submitted=self.submitted, requests_failed=self.failed, requests_rejected=self.rejected,
            requests_finished=dict(self.by_reason), requests_running=running, requests_waiting=waiting,
            prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens, steps=self.steps,
            busy_s=self.busy_s, tokens_per_s=self.generated_tokens / self.busy_s if self.busy_s > 0 else nan,
            uptime_s=time.perf_counter() - self.started, exit_counts=counts,
            mean_exit=sum(k * c for k, c in enumerate(counts)) / total if total else nan,
            acceptance_rate=self.accepted / self.drafted if self.drafted else nan,
            drafted_tokens=self.drafted, accepted_tokens=self.accepted)
