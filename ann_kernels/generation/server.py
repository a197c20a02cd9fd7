"""``GenerationServer``: iteration-level ("continuous") batching of early-exit generation
(Orca, Yu et al. OSDI'22: requests join and leave the running batch at every decode step).

One worker thread owns the batch and the KV caches. Its loop:

1. take waiting requests (FIFO) while rows are free (``max_batch_size`` rows in all); when
   the batch is empty and a burst is arriving (more than one request waits) it first waits up
   to ``max_wait_s`` for more, so the burst is prefilled together; a lone request (one client
   sending one request after another, or sparse arrivals) is prefilled at once, its time to
   first token not lengthened by a wait for company that may not come (requests that arrive
   during its prefill join at the next iteration, prefilled together);
2. prefill them, batched per mode (a :class:`~ann_kernels.generation.state.DecodeState` per
   distinct mode configuration: rows of one mode share a cache and step together), straight
   into the running batch;
3. drop rows that were cancelled or whose deadline passed (their slots are free at once);
   a request whose deadline passes while it still waits leaves the queue at the start of the
   next iteration (a heap of queued deadlines: one comparison per iteration when none is due),
   answered like a running row (``finish_reason`` "deadline", no tokens) and freeing its
   ``max_queue`` slot;
   a request cancelled while it waits (``future.cancel()``, a stream's ``cancel()``, an HTTP
   client that went away) leaves the queue in the cancelling call itself, so its ``max_queue``
   slot is free at once; the worker answers it ("cancelled", no tokens) at its next iteration
   (after the step in flight, if any), never prefilling it;
4. chunked prefill (``prefill_chunk_tokens``): a prompt longer than that which arrives while
   rows decode is not prefilled whole in step 2 (the running rows would wait for all of it:
   a spike in their inter-token gaps) but in chunks of at most ``prefill_chunk_tokens``
   positions, one chunk per iteration, between decode steps (one such prompt at a time, the
   others wait their turn FIFO; :mod:`~ann_kernels.generation.chunked_prefill`); it joins the
   batch after its last chunk. With no row decoding, the rest of it is prefilled at once;
5. one decode step of every mode's batch; each row's new tokens go to its stream; rows that
   hit EOS, ``max_new_tokens`` or a stop string leave at once.

Every prefill and decode step is logged (:meth:`GenerationServer.steps`, from a bounded deque of
:class:`~ann_kernels.generation.requests.StepRecord`), which is how the tests see which
requests shared a step. A row's greedy tokens do not depend on the batch around it (the
decode state's property): equal to :func:`ann_kernels.generate` on that prompt alone.

Failures: bad arguments raise from ``submit`` (ValueError naming the argument); a full queue
raises :class:`~ann_kernels.generation.requests.ServerBusyError`; a prefill that fails is
retried row by row, so only the request that causes it fails; a decode step that fails fails
the rows of that mode's batch (the step cannot say which row caused it) and the batch is
rebuilt; a tokenizer error fails its own request.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import deque

import torch

from ann_kernels.generation.adapters import as_adapter
from ann_kernels.generation.api import check_prompts
from ann_kernels.generation.chunked_prefill import ChunkedPrefill
from ann_kernels.generation.requests import (
    Completion,
    GenerationFuture,
    ServerBusyError,
    StepRecord,
    TokenChunk,
    TokenStream,
)
from ann_kernels.generation.server_intake import MODE_KEYS, REQUEST_PARAMS, ServerRequest, resolve_params
from ann_kernels.generation.server_stats import GenerationServerStats, ServerTotals
from ann_kernels.generation.state import DecodeState, ModeConfig
from ann_kernels.generation.text import StopTextState, encode_text

__all__ = ["GenerationServer", "REQUEST_PARAMS"]

class GenerationServer:
    """Serve one causal LM with iteration-level batching (module docstring).

    Args:
        model: our ``CausalExitLM``, a Hugging Face ``LlamaForCausalLM`` (with
            ``exit_layers``) or a ``DecoderAdapter`` (as :func:`ann_kernels.generate`).
        tokenizer: for string prompts, text and stop strings: a ``tokenizers.Tokenizer``
            (``encode(text).ids``), a Hugging Face tokenizer (``encode(text)`` -> ids) or
            any object with ``encode`` / ``decode``; None: token-id prompts only.
        max_batch_size: rows decoded at once (all modes together).
        max_wait_s: how long an idle server with more than one request waiting (a burst)
            waits for more before a prefill; a lone request is prefilled at once (module
            docstring, step 1).
        max_queue: waiting requests beyond which ``submit`` raises ``ServerBusyError``.
        eos_token_id: None, an id or ids that end a row.
        exit_layers: for Hugging Face models (see ``generate``).
        step_log_size: entries kept in the step log (:meth:`steps`).
        prefill_chunk_tokens: None (every prompt prefilled whole) or the most prompt positions
            prefilled per iteration for a long prompt joining a running batch (module
            docstring, step 4).
        mode, **generate_defaults: the defaults of every request's parameters
            (:data:`REQUEST_PARAMS`: ``max_new_tokens``, ``mode``, ``exit_index``,
            ``draft_len``, ``threshold``, ``criterion``, ``kv_policy``, ``verify_chunk``,
            ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``,
            ``deadline_s``), validated here. A request that names its own ``mode`` takes
            the other mode settings (``exit_index``, ``threshold``, ...) from its own
            parameters only (the built-in defaults otherwise), never from the server's.

    The worker starts at once; ``close()`` drains. Use as a context manager.
    """

    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 32, max_wait_s: float = 0.002,
                 mode: str = "full", max_queue: int = 1024, eos_token_id=None, exit_layers=None,
                 step_log_size: int = 100_000, prefill_chunk_tokens: int | None = None, **generate_defaults) -> None:
        unknown = sorted(set(generate_defaults) - set(REQUEST_PARAMS))
        if unknown:
            raise ValueError(f"generate_defaults: unknown parameters {unknown}; expected some of {sorted(REQUEST_PARAMS)}")
        for name, value, lo in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 1),
                                ("step_log_size", step_log_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
        if prefill_chunk_tokens is not None and (isinstance(prefill_chunk_tokens, bool) or not isinstance(
                prefill_chunk_tokens, int) or prefill_chunk_tokens < 1):
            raise ValueError(f"prefill_chunk_tokens: expected None or an int >= 1, got {prefill_chunk_tokens!r}")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s < math.inf:
            raise ValueError(f"max_wait_s: expected finite seconds >= 0, got {max_wait_s!r}")
        self.adapter = as_adapter(model, exit_layers)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, float(max_wait_s), max_queue
        self.num_exits = self.adapter.num_exits
        self.max_len = self.adapter.max_len
        self.eos_token_id = eos_token_id
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.adapter.vocab_size:
                    raise ValueError(f"eos_token_id: expected ids in [0, {self.adapter.vocab_size}), got {eos_token_id!r}")
            self._eos = set(ids)
        else:
            self._eos = set()
        self.defaults = {**REQUEST_PARAMS, **generate_defaults, "mode": mode}
        # the defaults must make a valid request
        self._default = resolve_params(self.adapter, self.tokenizer, dict(self.defaults))[1]
        self.step_log: deque[StepRecord] = deque(maxlen=step_log_size)
        self._cond = threading.Condition()
        self._waiting: deque[ServerRequest] = deque()
        self._queued_deadlines: list[tuple[float, int, ServerRequest]] = []  # heap over waiting requests (lazy)
        self._cancelled_waiting: list[ServerRequest] = []  # left the queue when cancelled; the worker answers them
        self._active: dict[int, ServerRequest] = {}
        self._states: dict[ModeConfig, DecodeState] = {}
        self._staged: deque[ServerRequest] = deque()  # long prompts to prefill in chunks (step 4), first = current
        self._next_id = 0
        self._steps = 0
        self._closing = self._abort = False
        self._listeners: list = []
        self.totals = ServerTotals(num_exits=self.num_exits)
        self._worker = threading.Thread(target=self._run, name="GenerationServer", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public API
    def add_listener(self, callback) -> None:
        """``callback(completion)`` for every finished request (on the worker thread; keep it
        quick): the metrics module observes TTFT, inter-token latency and queue time here."""
        self._listeners.append(callback)

    def start(self) -> GenerationServer:
        """The worker runs from construction; this is for callers written for
        ``EarlyExitServer`` (``server.start()``, e.g. the Ray Serve wrapper). Raises once closed."""
        if self._closing:
            raise RuntimeError("server: closed; create a new GenerationServer")
        return self

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, prompt, **params) -> GenerationFuture:
        """Queue one request; the future's result is a :class:`Completion`.

        ``prompt``: a string (needs the tokenizer) or a list of token ids; ``params``: any of
        :data:`REQUEST_PARAMS` (the server's defaults otherwise). Raises ValueError for a bad
        argument, :class:`ServerBusyError` when ``max_queue`` requests wait, RuntimeError once
        closed. ``future.cancel()`` stops the request even mid-generation."""
        return self._enqueue(prompt, params, stream=False).future

    def stream(self, prompt, **params) -> TokenStream:
        """As :meth:`submit`, but a :class:`TokenStream` of :class:`TokenChunk` as the tokens
        come (``for`` or ``async for``); ``stream.future`` has the whole completion."""
        return self._enqueue(prompt, params, stream=True)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: a text prompt needs a tokenizer (GenerationServer(model, tokenizer)); "
                             "pass a list of token ids")
        return encode_text(self.tokenizer, text)

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting requests and finish every accepted one (the drain); True if they all
        finished within ``timeout`` seconds (None: as long as it takes). Past the timeout the
        rest fail with RuntimeError (never left without an answer)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if not self._worker.is_alive():
            return True
        with self._cond:
            self._abort = True
            self._cond.notify_all()
        self._worker.join()
        return False

    def __enter__(self) -> GenerationServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[StepRecord]:
        """A copy of the step log (the latest ``step_log_size`` prefills and decode steps, in
        order): which requests shared each forward. Safe while the worker runs."""
        with self._cond:
            return list(self.step_log)

    def stats(self) -> GenerationServerStats:
        """A snapshot of the counters (:class:`GenerationServerStats`)."""
        with self._cond:
            waiting = len(self._waiting)
            running = len(self._active)
        return self.totals.snapshot(running=running, waiting=waiting)

    # ------------------------------------------------------------------ intake
    def _enqueue(self, prompt, params: dict, stream: bool) -> TokenStream:
        if self._closing:
            raise RuntimeError("server: closed (draining); send the request elsewhere")
        unknown = sorted(set(params) - set(REQUEST_PARAMS))
        if unknown:
            raise ValueError(f"params: unknown parameters {unknown}; expected some of {sorted(REQUEST_PARAMS)}")
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, (bytes, dict)) or not hasattr(ids, "__len__"):
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise ValueError("prompt: expected token ids (ints)")
        ids = [int(t) for t in ids]
        base = self.defaults
        if "mode" in params:  # a request's own mode: the server's mode settings do not leak into it
            base = {**base, **{k: REQUEST_PARAMS[k] for k in MODE_KEYS if k not in ("mode", "criterion")}}
        row, config, stop, deadline, max_new = resolve_params(self.adapter, self.tokenizer, {**base, **params})
        if not ids:
            raise ValueError("prompt: empty prompt (a request needs at least one token)")
        check_prompts([ids], self.adapter.vocab_size, self.max_len, [max_new])
        with self._cond:
            if self._closing:
                raise RuntimeError("server: closed (draining); send the request elsewhere")
            if len(self._waiting) >= self.max_queue:
                self.totals.rejected += 1
                raise ServerBusyError(f"server: busy ({len(self._waiting)} requests waiting, max_queue "
                                      f"{self.max_queue}); retry later")
            rid = self._next_id
            self._next_id += 1
            future = GenerationFuture(rid)
            token_stream = TokenStream(future)
            text = StopTextState(self.tokenizer, stop, self._eos, incremental=stream or bool(stop))
            req = ServerRequest(rid, ids, row, config, text, None, future, token_stream if stream else None)
            if deadline is not None:
                req.deadline = req.submitted + deadline
                heapq.heappush(self._queued_deadlines, (req.deadline, rid, req))
            req.queued = True
            self._waiting.append(req)
            future.add_done_callback(lambda f, req=req: self._on_future_done(req, f))
            self.totals.submitted += 1
            self._cond.notify_all()
        return token_stream

    def _on_future_done(self, req: ServerRequest, future: GenerationFuture) -> None:
        """A request's future is done (on the thread that made it so): when it was cancelled while
        still waiting, take it out of the queue now, freeing its ``max_queue`` slot; the worker
        answers it at its next iteration."""
        if not future.cancelled():
            return
        with self._cond:
            if req.queued:
                req.queued = False
                self._waiting.remove(req)
                self._cancelled_waiting.append(req)
                self._cond.notify_all()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._cancelled_waiting or self._closing):
                    self._cond.wait()
                cancelled, self._cancelled_waiting = self._cancelled_waiting, []
            for req in cancelled:
                self._finish(req, "cancelled")
            with self._cond:
                if self._abort or (self._closing and not self._waiting and not self._active
                                   and not self._cancelled_waiting):
                    break
                if not self._active and len(self._waiting) > 1 and self.max_wait_s > 0 and not self._closing:
                    until = time.perf_counter() + self.max_wait_s
                    while len(self._waiting) < self.max_batch_size and not self._closing:
                        left = until - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                expired = self._pop_expired_waiting()
                free = self.max_batch_size - len(self._active)
                take = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                for req in take:
                    req.queued = False
                    self._active[req.id] = req
            for req in expired:
                self._finish(req, "deadline")
            try:
                self._admit(take)
                self._drop_stopped()
                self._prefill_chunks()
                for config in list(self._states):
                    self._decode(config)
            except Exception as error:  # noqa: BLE001  a bug here must not strand requests
                for req in list(self._active.values()):
                    self._fail(req, error)
                self._states.clear()
                self._staged.clear()
        self._shutdown()

    def _pop_expired_waiting(self) -> list[ServerRequest]:
        """Waiting requests whose deadline has passed, taken out of the queue (call holding
        ``_cond``). Heap entries of requests already admitted are skipped as they surface, and
        the heap is emptied whenever the queue is, so it never outgrows the requests in flight."""
        heap = self._queued_deadlines
        if not self._waiting:
            heap.clear()
            return []
        if not heap or heap[0][0] > time.perf_counter():
            return []
        now, expired = time.perf_counter(), []
        while heap and heap[0][0] <= now:
            req = heapq.heappop(heap)[2]
            if req.queued:
                req.queued = False
                expired.append(req)
        if expired:
            gone = {r.id for r in expired}
            self._waiting = deque(r for r in self._waiting if r.id not in gone)
        return expired

    def _shutdown(self) -> None:
        error = RuntimeError("server: closed before this request finished (the drain timeout passed)")
        with self._cond:
            left = list(self._waiting) + list(self._active.values())
            cancelled, self._cancelled_waiting = self._cancelled_waiting, []
            self._waiting.clear()
            for req in left:
                req.queued = False
        for req in cancelled:
            self._finish(req, "cancelled")
        for req in left:
            if req.state is not None:
                req.state = None
            self._fail(req, error)
        self._states.clear()
        self._staged.clear()

    def _log(self, kind: str, mode: str, ids) -> None:
        record = StepRecord(self._steps, kind, mode, tuple(ids))
        with self._cond:
            self.step_log.append(record)
        self._steps += 1

    def _state_for(self, config: ModeConfig) -> DecodeState:
        state = self._states.get(config)
        if state is None:
            state = DecodeState(self.adapter, config, max_batch_size=self.max_batch_size, max_positions=self.max_len,
                                eos_token_id=sorted(self._eos) or None)
            self._states[config] = state
        return state

    def _admit(self, take: list[ServerRequest]) -> None:
        """Prefill the taken requests, batched per mode; a failing batch is retried row by row."""
        now = time.perf_counter()
        groups: dict[ModeConfig, list[ServerRequest]] = {}
        chunk = self.prefill_chunk_tokens
        decoding = chunk is not None and any(st.num_rows for st in self._states.values())
        for req in take:
            if req.future.cancelled():
                self._finish(req, "cancelled")
            elif req.deadline is not None and now >= req.deadline:
                self._finish(req, "deadline")
            elif decoding and len(req.prompt) - 1 > chunk:
                self._staged.append(req)
            else:
                groups.setdefault(req.config, []).append(req)
        for config, reqs in groups.items():
            state = self._state_for(config)
            if not self._prefill(state, reqs) and len(reqs) > 1:
                for req in reqs:  # find the request that fails: the others go on
                    self._prefill(self._state_for(config), [req])

    def _prefill(self, state: DecodeState, reqs: list[ServerRequest]) -> bool:
        ids = [r.id for r in reqs]
        t0 = time.perf_counter()
        try:
            state.add_rows([r.prompt for r in reqs], [r.params for r in reqs], ids)
        except Exception as error:  # noqa: BLE001
            try:
                state.remove_rows(ids)
            except Exception:  # noqa: BLE001  the state is unusable: its running rows fail, it is rebuilt
                self._states.pop(state.config, None)
                for other in list(self._active.values()):
                    if other.state is state:
                        other.state = None
                        self._fail(other, error)
            if len(reqs) == 1:
                self._fail(reqs[0], error)
            return False
        now = time.perf_counter()
        self.totals.busy_s += now - t0
        self.totals.prompt_tokens += sum(len(r.prompt) for r in reqs)
        for r in reqs:
            r.admitted, r.state = now, state
        self._log("prefill", state.config.mode, ids)
        return True

    def _drop_stopped(self) -> None:
        """Rows cancelled or past their deadline leave their batch (or the chunked prefill) now."""
        now = time.perf_counter()
        for req in list(self._active.values()):
            if req.future.cancelled():
                self._remove_row(req)
                self._finish(req, "cancelled")
            elif req.deadline is not None and now >= req.deadline:
                self._remove_row(req)
                self._finish(req, "deadline")

    def _remove_row(self, req: ServerRequest) -> None:
        if req.state is not None and req.id in req.state.row_ids:
            req.state.remove_rows([req.id])
        req.state = None
        if req in self._staged:
            self._staged.remove(req)
        req.chunked = None

    def _prefill_chunks(self) -> None:
        """Step 4 of the module docstring: up to ``prefill_chunk_tokens`` positions of the
        staged prompts (the first one's, then the next's), or all that is left when no row
        decodes; a prompt whose last chunk is in joins its batch."""
        budget = self.prefill_chunk_tokens
        while self._staged and budget > 0:
            req = self._staged[0]
            t0 = time.perf_counter()
            try:
                if req.chunked is None:
                    req.chunked = ChunkedPrefill(self._state_for(req.config), req.prompt, req.params, req.id)
                state = req.chunked.state
                if self._states.get(req.config) is not state:
                    raise RuntimeError("server: the batch this prompt was prefilled for failed and was rebuilt")
                if not any(st.num_rows for st in self._states.values()):
                    budget = req.chunked.total  # nobody waits for tokens: no reason to cut it
                budget -= req.chunked.run_chunk(budget)
                self._log("prefill_chunk", state.config.mode, [req.id])
                if req.chunked.finished:
                    self._staged.popleft()
                    req.state = state  # (a join that fails midway is undone by _remove_row)
                    req.chunked.join()
                    req.chunked, req.admitted = None, time.perf_counter()
                    self.totals.prompt_tokens += len(req.prompt)
            except Exception as error:  # noqa: BLE001  this prompt fails alone
                self._remove_row(req)
                self._fail(req, error)
            self.totals.busy_s += time.perf_counter() - t0

    def _decode(self, config: ModeConfig) -> None:
        state = self._states[config]
        if state.num_rows == 0:
            if config != self._default and not any(r.config == config for r in self._staged):
                del self._states[config]  # free a non-default mode's cache
            return
        ids = list(state.row_ids)
        c = state.counters
        drafted, accepted, t0 = c.drafted, c.accepted, time.perf_counter()
        try:
            events = state.step()
        except Exception as error:  # noqa: BLE001  cannot tell which row: the batch fails
            del self._states[config]
            for rid in ids:
                if rid in self._active:
                    self._active[rid].state = None
                    self._fail(self._active[rid], error)
            return
        now = time.perf_counter()
        self._log("decode", config.mode, ids)
        t = self.totals
        t.busy_s += now - t0
        t.steps += 1
        t.drafted += c.drafted - drafted
        t.accepted += c.accepted - accepted
        for ev in events:
            req = self._active.get(ev.row_id)
            if req is None:
                continue
            if ev.finished:
                req.state = None
            try:
                self._on_tokens(req, ev.tokens, ev.exits, ev.logprobs, ev.reason, now)
            except Exception as error:  # noqa: BLE001  e.g. the tokenizer failed on this row
                self._remove_row(req)
                self._fail(req, error)

    def _on_tokens(self, req: ServerRequest, tokens, exits, logprobs, reason, now: float) -> None:
        """Record a row's new tokens, send the chunk, finish the row when it is done."""
        t = self.totals
        t.generated_tokens += len(tokens)
        for e in exits:
            t.exit_counts[e] += 1
        if req.first is None:
            req.first = now
        elif tokens:
            gap = (now - req.last) / len(tokens)
            req.itl.extend([gap] * len(tokens))
        req.last = now
        req.tokens.extend(tokens)
        req.exits.extend(exits)
        req.logprobs.extend(logprobs)
        text, stopped = req.text.add(tokens, final=reason is not None)
        if stopped:
            self._remove_row(req)
            reason = "stop"
        if reason is not None:
            self._finish(req, reason, TokenChunk(list(tokens), list(exits), text, reason, list(logprobs)))
        elif req.stream is not None:
            req.stream.push(TokenChunk(list(tokens), list(exits), text, None, list(logprobs)))

    def _finish(self, req: ServerRequest, reason: str, last_chunk: TokenChunk | None = None) -> None:
        now = time.perf_counter()
        if req.stream is not None:
            req.stream.push(last_chunk if last_chunk is not None else TokenChunk([], [], req.text.flush(), reason))
            req.stream.end()
        elif last_chunk is None:
            req.text.flush()
        completion = Completion(
            request_id=req.id, prompt_tokens=len(req.prompt), token_ids=req.tokens, exits=req.exits,
            text=req.text.text, finish_reason=reason,
            queue_s=(req.admitted if req.admitted is not None else now) - req.submitted,
            ttft_s=None if req.first is None else req.first - req.submitted, inter_token_s=req.itl,
            e2e_s=now - req.submitted, mode=req.config.mode, logprobs=req.logprobs)
        with self._cond:
            self._active.pop(req.id, None)
        self.totals.finished(reason)
        if not req.future.cancelled():
            try:
                req.future.set_result(completion)
            except Exception:  # noqa: BLE001  cancelled meanwhile
                pass
        for listener in self._listeners:
            try:
                listener(completion)
            except Exception:  # noqa: BLE001  a metrics bug must not break serving
                pass

    def _fail(self, req: ServerRequest, error: BaseException) -> None:
        if req.stream is not None:
            req.stream.push(error)
        with self._cond:
            self._active.pop(req.id, None)
        self.totals.failed += 1
        if not req.future.done():
            try:
                req.future.set_exception(error)
            except Exception:  # noqa: BLE001
                pass
