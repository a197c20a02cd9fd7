"""What a :class:`~ann_kernels.generation.server.GenerationServer` knows about a request it
accepted: the per-request parameters (:data:`REQUEST_PARAMS`, their defaults), their
validation into engine settings (:func:`resolve_params`) and the request's life inside the
server (:class:`ServerRequest`: worker-thread state, except its future)."""

from __future__ import annotations

import time

import torch

from ann_kernels.generation.api import build_mode_config, check_sampling
from ann_kernels.generation.chunked_prefill import ChunkedPrefill
from ann_kernels.generation.state import DecodeState, ModeConfig, RowParams
from ann_kernels.generation.text import StopTextState

__all__ = ["MODE_KEYS", "REQUEST_PARAMS", "ServerRequest", "resolve_params"]

# per-request parameters (and server defaults) with their defaults
REQUEST_PARAMS = {
    "max_new_tokens": 64, "mode": "full", "exit_index": None, "draft_len": 4, "threshold": None,
    "criterion": "max_prob", "kv_policy": "recompute", "verify_chunk": None, "do_sample": False,
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": None, "stop": None, "deadline_s": None,
}
# the parameters that make a request's mode (rows of one mode configuration share a batch)
MODE_KEYS = ("mode", "exit_index", "draft_len", "threshold", "criterion", "kv_policy", "verify_chunk")


def resolve_params(adapter, tokenizer, params: dict) -> tuple[RowParams, ModeConfig, tuple, float | None, int]:
    """(RowParams, ModeConfig, stop strings, deadline_s, max_new_tokens) of a request's merged
    ``params`` (every key of :data:`REQUEST_PARAMS`); ValueError naming a bad one."""
    p = params
    config = build_mode_config(adapter, p["mode"], exit_index=p["exit_index"], draft_len=p["draft_len"],
                               threshold=p["threshold"], criterion=p["criterion"], kv_policy=p["kv_policy"],
                               verify_chunk=p["verify_chunk"])
    m = p["max_new_tokens"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {m!r}")
    if p["do_sample"]:
        check_sampling(p["temperature"], p["top_k"], p["top_p"])
    seed, generator = p["seed"], None
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int or None, got {seed!r}")
        generator = torch.Generator(device=adapter.device).manual_seed(seed % (1 << 63))
    stop = p["stop"]
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop: expected non-empty strings, got {p['stop']!r}")
    if stop and tokenizer is None:
        raise ValueError("stop: stop strings need a tokenizer (GenerationServer(model, tokenizer))")
    deadline = p["deadline_s"]
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not deadline > 0):
        raise ValueError(f"deadline_s: expected seconds > 0 or None, got {deadline!r}")
    row = RowParams(max_new_tokens=m, do_sample=bool(p["do_sample"]), temperature=float(p["temperature"]),
                    top_k=int(p["top_k"]), top_p=float(p["top_p"]), generator=generator)
    return row, config, stop, deadline, m


class ServerRequest:
    """One request's life inside the server (worker-thread state, except ``future``)."""

    __slots__ = ("id", "prompt", "params", "config", "text", "deadline", "future", "stream", "submitted",
                 "admitted", "first", "last", "tokens", "exits", "logprobs", "itl", "state", "queued", "chunked")

    def __init__(self, rid, prompt, params, config, text, deadline, future, stream):
        self.id, self.prompt, self.params, self.config = rid, prompt, params, config
        self.text: StopTextState = text
        self.deadline, self.future, self.stream = deadline, future, stream
        self.submitted = time.perf_counter()
        self.admitted = self.first = self.last = None
        self.tokens: list[int] = []
        self.exits: list[int] = []
        self.logprobs: list[float] = []
        self.itl: list[float] = []
        self.state: DecodeState | None = None  # its batch, once prefilled
        self.queued = False  # in the server's waiting deque
        self.chunked: ChunkedPrefill | None = None  # its chunked prefill, once started
