"""The decode state: a batch of rows (requests) on one preallocated KV cache, driven step by
step (``add_rows`` / ``step`` / ``remove_rows``), so a server can let requests join and leave
between decode steps (iteration-level batching) and :func:`ann_kernels.generate` is a loop
over ``step``.

Layout. Active rows occupy cache slots 0 .. n - 1. Row r knows ``length[r]`` tokens
(prompt + generated; ``tokens[r, :length]`` on the device); the last one, at position
p = length - 1, is the input of the next step and is not in the cache yet. Layers are grouped
into segments by the exits (segment s = the layers after exit s - 1 up to exit s);
``seg_len[r, s]`` is how many positions of row r the cache of segment s's layers holds
(positions 0 .. seg_len - 1; all segments = p after a full step). ``seg_len`` is
non-increasing in s: positions that left at an earlier exit wait, with their state after that
exit kept in ``hidden[r, t]``, until the row's next token that goes deeper carries them
through the skipped layers (``kv_policy="recompute"``), or get their K/V at once
(``"propagate"``). A query at position p only runs in a segment after positions
0 .. p - 1 are valid there, so the causal mask on absolute positions is all the masking needed.

Rows that finish (EOS, ``max_new_tokens``) leave the batch compacted (the last live rows move
into the holes: one slot copied per moving row, per layer) or stay masked in their slots (their
outputs ignored, their length frozen, rewriting only their own last position) until compaction
pays: ``ModeConfig.finished_rows`` "compact" | "mask" | "auto" (per step, from the measured cost
model of ``ann_kernels.generation.row_policy``). Removed rows, and masked rows when rows join,
are compacted at once. Slots 0 .. width - 1 are in use (live and masked rows).

Bookkeeping (lengths, counts) lives in host int64 tensors; the device gets one small position
tensor per forward. Each step syncs once (the new tokens come back to the host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ann_kernels.generation.adapters import DecoderAdapter
from ann_kernels.generation.cache import KVCache, cached_attention
from ann_kernels.generation.modes import STEP_FUNCTIONS
from ann_kernels.generation.row_policy import RowCosts, measure_row_costs, prefer_masking
from ann_kernels.generation.sampling import RowSampling

__all__ = ["DecodeState", "ModeConfig", "RowParams", "StepEvent", "GenerationCounters"]

MODES = ("full", "static", "confidence", "self_speculative")


@dataclass(frozen=True)
class ModeConfig:
    """How every row of a :class:`DecodeState` decodes (validated by ``generate``).

    ``exit_index``: the exit of ``static`` and the draft exit of ``self_speculative``;
    ``thresholds``: K floats for ``confidence`` (the last is ignored: the last exit takes all);
    ``verify_chunk``: self-speculative verification, positions per pass (None: all d + 1 in
    one pass; 1: one position at a time, the shapes of ``full``'s steps);
    ``finished_rows``: "auto" (per step, the cheaper by the measured cost model), "compact"
    or "mask" (see the module docstring); ``draft_confidence``: None (LayerSkip: draft
    ``draft_len`` tokens) or p in [0, 1]: a row stops drafting after a draft token whose
    probability under the draft exit is below p; ``draft_candidates`` K > 0: greedy drafts
    take the argmax over a cached candidate set (the batch's prompt and generated tokens and
    the full model's top K at every verified position) instead of the whole vocabulary."""

    mode: str = "full"
    exit_index: int | None = None
    draft_len: int = 4
    thresholds: tuple[float, ...] | None = None
    criterion: str = "max_prob"
    kv_policy: str = "recompute"
    verify_chunk: int | None = None
    finished_rows: str = "auto"
    draft_confidence: float | None = None
    draft_candidates: int = 0


@dataclass
class RowParams:
    """Per-request settings: ``max_new_tokens``, sampling, an optional own generator."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class StepEvent:
    """What one row got in one step: new tokens, the exit of each, whether it finished
    (``reason`` "eos" / "length", else None), and each token's log-probability (natural log,
    under the distribution that produced it: see ``generate``'s ``out.logprobs``)."""

    row_id: object
    tokens: list[int]
    exits: list[int]
    finished: bool
    reason: str | None
    logprobs: list[float] = field(default_factory=list)


@dataclass
class GenerationCounters:
    """Running totals of a decode state (``generate`` turns them into ``out.stats``)."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    new_tokens: int = 0
    exit_sum: int = 0
    layer_evals: float = 0.0  # decode layer x position evaluations (propagate: K/V share of a layer)
    prefill_evals: float = 0.0
    drafted: int = 0
    accepted: int = 0
    verify_rows: int = 0  # row-verify passes (self-speculative)
    draft_steps: int = 0  # batched draft passes (self-speculative)
    head_evals: int = 0  # row x exit-head evaluations (decode)
    row_steps: int = 0  # sum over steps of the rows in the batch (live and masked)
    live_row_steps: int = 0  # sum over steps of the live rows
    compactions: int = 0  # steps after which finished or masked rows were compacted
    masked_steps: int = 0  # steps run with masked rows in the batch
    exit_counts: list[int] = field(default_factory=list)


class DecodeState:
    """A batch of rows decoding with one mode on one cache (see the module docstring).

    Args:
        adapter: the model (:func:`ann_kernels.generation.as_adapter`).
        config: the mode (:class:`ModeConfig`).
        max_batch_size: slots in the cache.
        max_positions: the most positions a row may use (prompt + max_new_tokens).
        eos_token_id: None, an int or a list of ints.
        generator: the shared generator of sampling rows without their own.
    """

    @torch.inference_mode()
    def __init__(self, adapter: DecoderAdapter, config: ModeConfig, *, max_batch_size: int, max_positions: int,
                 eos_token_id=None, generator: torch.Generator | None = None):
        self.adapter, self.config = adapter, config
        ad = adapter
        self.device = ad.device
        slack = config.draft_len + 1 if config.mode == "self_speculative" else 0
        self.max_positions = max_positions
        self.T = max_positions + slack  # cache positions; column T is the padding scratch
        self.slots = max_batch_size
        self.num_exits = ad.num_exits
        bounds, start = [], 0
        for e in ad.exit_layers:
            bounds.append(range(start, e + 1))
            start = e + 1
        self.segments = bounds
        self.cache = KVCache(ad.num_layers, max_batch_size, ad.num_kv_heads, ad.head_dim, self.T, ad.dtype, self.device)
        self.gqa = ad.num_heads != ad.num_kv_heads
        self.scale = getattr(ad, "scaling", None)
        self.tokens = torch.zeros(max_batch_size, self.T + 1, dtype=torch.int64, device=self.device)
        needs_hidden = config.mode == "confidence"
        self.hidden = (torch.zeros(max_batch_size, self.T + 1, ad.hidden_size, dtype=ad.dtype, device=self.device)
                       if needs_hidden else None)
        self.length = torch.zeros(max_batch_size, dtype=torch.int64)
        self.seg_len = torch.zeros(max_batch_size, self.num_exits, dtype=torch.int64)
        self.generated = torch.zeros(max_batch_size, dtype=torch.int64)
        self.max_new = torch.zeros(max_batch_size, dtype=torch.int64)
        self.do_sample = torch.zeros(max_batch_size, dtype=torch.bool)
        self.temperature = torch.ones(max_batch_size, dtype=torch.float32)
        self.top_k = torch.zeros(max_batch_size, dtype=torch.int64)
        self.top_p = torch.ones(max_batch_size, dtype=torch.float32)
        self.row_generators: list[torch.Generator | None] = [None] * max_batch_size
        self.slot_ids: list[object] = []  # the id of the row in each slot in use (masked rows too)
        self.masked = torch.zeros(max_batch_size, dtype=torch.bool)  # finished, still in its slot
        self.num_masked = 0
        self.row_costs: RowCosts | None = None  # measured on first need (finished_rows="auto")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(eos, dtype=torch.int64)
        self.eos_set = frozenset(eos)
        self.generator = generator
        self.counters = GenerationCounters(exit_counts=[0] * self.num_exits)
        self._arange = torch.arange(max(max_batch_size, self.T + 1), device=self.device)
        self._arange_host = torch.arange(max(max_batch_size, self.T + 1))
        self._sync = self.device.type == "cuda"
        self._sampling_cache = None
        # valid until rows change (add / keep) or a step appends other than one token per row:
        self.next_input: tuple[int, Tensor] | None = None  # (n, the rows' next input tokens [n])
        self._min_left: int | None = None  # the fewest tokens any row has left (one-token steps)
        self._constant_exits: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self._step_exit: int | None = None  # this step's exit when every row has it (constant_exits)
        # self-speculative candidate draft head: tokens seen or ranked high by the verifier
        self.candidates = (torch.zeros(ad.vocab_size, dtype=torch.bool, device=self.device)
                           if config.mode == "self_speculative" and config.draft_candidates > 0 else None)

    # ------------------------------------------------------------------ rows
    @property
    def num_rows(self) -> int:
        """Live rows (masked ones excluded)."""
        return len(self.slot_ids) - self.num_masked

    @property
    def width(self) -> int:
        """Slots in use: live and masked rows."""
        return len(self.slot_ids)

    @property
    def row_ids(self) -> list:
        """The live rows' ids, in slot order."""
        if not self.num_masked:
            return list(self.slot_ids)
        masked = self.masked[: self.width].tolist()
        return [r for r, dead in zip(self.slot_ids, masked) if not dead]

    @torch.inference_mode()
    def add_rows(self, prompts: list[list[int]], params: list[RowParams], row_ids: list) -> None:
        """Append rows (prompts of >= 1 token ids) and prefill their caches (batched)."""
        if self.num_masked:  # joining rows go after the live ones
            self._keep(self._live_slots())
        b, n = len(prompts), self.width
        if n + b > self.slots:
            raise ValueError(f"prompts: {b} new rows do not fit; {n} of {self.slots} slots are in use")
        if len(params) != b or len(row_ids) != b:
            raise ValueError(f"params / row_ids: expected {b} each (one per prompt), got {len(params)} / {len(row_ids)}")
        limit = min(self.max_positions, self.adapter.max_len)
        for i, (p, rp) in enumerate(zip(prompts, params)):
            if not p:
                raise ValueError(f"prompts[{i}]: empty prompt (a row needs at least one token)")
            if min(p) < 0 or max(p) >= self.adapter.vocab_size:
                raise ValueError(f"prompts[{i}]: token ids must lie in [0, {self.adapter.vocab_size})")
            if rp.max_new_tokens < 1 or len(p) + rp.max_new_tokens > limit:
                raise ValueError(f"max_new_tokens: prompts[{i}] has {len(p)} tokens; {len(p)} + max_new_tokens "
                                 f"{rp.max_new_tokens} exceeds the {limit} positions a row may use here")
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        width = int(lens.max())
        padded = torch.zeros(b, width, dtype=torch.int64)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
        self.tokens[n:n + b, :width] = padded.to(self.device)
        if self.candidates is not None:
            self.candidates[torch.as_tensor([t for p in prompts for t in p], device=self.device)] = True
        self.length[n:n + b] = lens
        self.generated[n:n + b] = 0
        for i, rp in enumerate(params):
            s = n + i
            self.max_new[s] = rp.max_new_tokens
            self.do_sample[s] = rp.do_sample
            self.temperature[s] = rp.temperature
            self.top_k[s] = rp.top_k
            self.top_p[s] = rp.top_p
            self.row_generators[s] = rp.generator
        self.slot_ids.extend(row_ids)
        self._sampling_cache = None
        self.next_input = self._min_left = None
        last_seg = self.config.exit_index if self.config.mode == "static" else self.num_exits - 1
        t0 = time.perf_counter()
        self._prefill(n, b, lens - 1, last_seg)
        self.seg_len[n:n + b, : last_seg + 1] = (lens - 1).unsqueeze(1)
        self.wait()
        self.counters.prefill_s += time.perf_counter() - t0
        self.counters.prefill_tokens += int(lens.sum())

    def _prefill(self, first: int, b: int, counts: Tensor, last_seg: int) -> None:
        """Positions 0 .. count - 1 of slots first .. first + b - 1 through segments 0..last_seg."""
        s = int(counts.max())
        if s == 0:
            return
        j = self._arange_host[:s].unsqueeze(0)
        valid = j < counts.unsqueeze(1)
        qpos = torch.where(valid, j, 0)
        write = torch.where(valid, j, self.T)
        tokens = self.tokens[first:first + b, :s]
        h = self.adapter.embed(tokens, qpos.to(self.device))
        layers = [i for seg in self.segments[: last_seg + 1] for i in seg]
        self.run_layers(layers, h, qpos, write, rows=first, window=s, force_mask=True)
        self.counters.prefill_evals += float(counts.sum()) * len(layers)

    @torch.inference_mode()
    def remove_rows(self, row_ids) -> None:
        """Take rows out of the batch (finished or cancelled); their slots are freed."""
        drop = set(row_ids)
        live = self._live_slots()
        self._keep([i for i in live if self.slot_ids[i] not in drop])

    def _live_slots(self) -> list[int]:
        if not self.num_masked:
            return list(range(self.width))
        return [i for i, dead in enumerate(self.masked[: self.width].tolist()) if not dead]

    def copy_slots(self, src: Tensor, dst: Tensor) -> None:
        """Copy the device state (every layer's K/V, tokens, hidden) of slots ``src`` [m] into
        slots ``dst`` [m] (device int64)."""
        self.cache.move_rows(src, dst)
        for t in (self.tokens, self.hidden):
            if t is not None:
                t.index_copy_(0, dst, t.index_select(0, src))

    def _keep(self, keep: list[int]) -> None:
        """Keep the rows of slots ``keep`` (ascending), compacted into slots 0 .. len - 1;
        masked rows not in ``keep`` leave too."""
        self._sampling_cache = None
        self.next_input = self._min_left = None
        n, m = self.width, len(keep)
        if m == n:
            return
        keep_set = set(keep)
        holes = [i for i in range(m) if i not in keep_set]
        movers = [i for i in keep if i >= m]
        if holes:
            src, dst = torch.tensor(movers), torch.tensor(holes)
            self.copy_slots(src.to(self.device), dst.to(self.device))
            for t in (self.length, self.seg_len, self.generated, self.max_new, self.do_sample, self.temperature,
                      self.top_k, self.top_p, self.masked):
                t.index_copy_(0, dst, t.index_select(0, src))
            for s_, d_ in zip(movers, holes):
                self.row_generators[d_] = self.row_generators[s_]
                self.slot_ids[d_] = self.slot_ids[s_]
        del self.slot_ids[m:]
        for i in range(m, n):
            self.row_generators[i] = None
        self.masked[m:n] = False
        self.num_masked = int(self.masked[:m].sum())

    # ------------------------------------------------------------------ forward
    def run_layers(self, layers, h: Tensor, qpos: Tensor, write: Tensor, *, rows=None, window: int | None = None,
                   force_mask: bool = False, mask: Tensor | None = None) -> Tensor:
        """Run ``layers`` on h [m, s, D] at query positions ``qpos`` [m, s] (host int64; K/V
        written at ``write`` [m, s]). ``rows``: None (slots 0..m-1), an int (slots
        rows..rows+m-1) or a device tensor of slots. The mask is built when the rows' query
        positions differ or s > 1 (``force_mask``), unless the caller passes it: ``mask``
        [m, 1, s, window] (device bool, True = attend; ``window`` then required)."""
        ad = self.adapter
        same = None
        if mask is None:
            differ = force_mask or qpos.shape[1] > 1
            if not differ:  # one position per row: read them once as Python ints (host tensor, no sync)
                qpos_list = qpos.reshape(-1).tolist()
                first_pos = qpos_list[0]
                differ = any(q != first_pos for q in qpos_list)
                if window is None:
                    window = max(qpos_list) + 1
            elif window is None:
                window = int(qpos.max()) + 1
            if differ:
                keys = self._arange_host[:window].view(1, 1, 1, window)
                mask = (keys <= qpos.view(qpos.shape[0], 1, qpos.shape[1], 1)).to(self.device)
            elif write is qpos:  # one token per row, all at one position, written where it queries
                same = first_pos
        qpos_d = qpos.to(self.device)
        write_d = qpos_d if write is qpos else write.to(self.device)
        rope = ad.rope(qpos_d, h)
        index = self.cache.write_index(write_d, rows, same)
        for i in layers:
            q, k, v = ad.qkv(i, h, rope)
            a = cached_attention(self.cache, i, q, k, v, write_d, mask, window, self.gqa, self.scale, rows, index)
            h = ad.finish_layer(i, h, a)
        return h

    def segment_layers(self, first: int, last: int) -> list[int]:
        """Layer indices of segments first..last (inclusive)."""
        return [i for seg in self.segments[first: last + 1] for i in seg]

    def constant_exits(self, n: int, exit_id: int) -> tuple[Tensor, Tensor]:
        """(exits [n] all ``exit_id`` on the device, counts [n] host ones) of a one-token
        step; built once per (n, exit_id) and reused (callers only read them)."""
        key = (n, exit_id)
        got = self._constant_exits.get(key)
        if got is None:
            got = (torch.full((n,), exit_id, dtype=torch.int64, device=self.device),
                   torch.ones(n, dtype=torch.int64))
            self._constant_exits[key] = got
        self._step_exit = exit_id
        return got

    def wait(self) -> None:
        """Wait for the device (CUDA) to finish the queued work; nothing on CPU."""
        if self._sync:
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ sampling
    def sampling(self, n: int) -> RowSampling:
        """The active rows' sampling parameters (cached until rows join or leave)."""
        cached = self._sampling_cache
        if cached is not None and cached[0] == n:
            return cached[1]
        ds = self.do_sample[:n]
        any_sample = bool(ds.any())
        plain = not bool(((self.top_k[:n] > 0) | (self.top_p[:n] < 1)).any()) if any_sample else True
        dev = self.device
        out = RowSampling(ds.to(dev), self.temperature[:n].to(dev), self.top_k[:n].to(dev), self.top_p[:n].to(dev),
                          any_sample, plain)
        self._sampling_cache = (n, out)
        return out

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One decode step of every live row (each gets >= 1 new token); finished rows leave
        the batch or stay masked (``ModeConfig.finished_rows``). Returns one event per row
        that was live."""
        n = self.width
        if self.num_rows == 0:
            return []
        t0 = time.perf_counter()
        self._step_exit = None
        new_tokens, new_exits, counts, logprobs = STEP_FUNCTIONS[self.config.mode](self, n)
        ctr = self.counters
        ctr.row_steps += n
        ctr.live_row_steps += n - self.num_masked
        if self.num_masked:
            ctr.masked_steps += 1
            self._refresh_masked(n)
        events, finished = self._append(n, new_tokens, new_exits, counts, logprobs)
        if finished:
            self._retire(n, finished)
        self.wait()
        ctr.decode_s += time.perf_counter() - t0
        ctr.steps += 1
        return events

    def _refresh_masked(self, n: int) -> None:
        """Masked rows never advance: each step reruns their last position, so every segment
        holds at most positions 0 .. p - 1 of them again (p = length - 1)."""
        dead = self.masked[:n]
        p = (self.length[:n] - 1).unsqueeze(1)
        self.seg_len[:n] = torch.where(dead.unsqueeze(1), torch.minimum(self.seg_len[:n], p), self.seg_len[:n])

    def _retire(self, n: int, finished: list[int]) -> None:
        """Rows of slots ``finished`` are done: compact every dead row now, or mask them."""
        self.masked[finished] = True
        self.num_masked += len(finished)
        live = self._live_slots()
        policy = self.config.finished_rows
        if live and policy != "compact" and (policy == "mask" or self._masking_pays(live)):
            return
        self._keep(live)
        self.counters.compactions += 1

    def _masking_pays(self, live: list[int]) -> bool:
        """The cost model's choice (``row_policy.prefer_masking``) for the current dead rows."""
        m = len(live)
        movers = sum(1 for i in live if i >= m)
        if movers == 0:
            return False  # compaction is a truncation: free
        ctr = self.counters
        rows = max(ctr.row_steps, 1)
        left = int((self.max_new[live] - self.generated[live]).max())
        tokens_per_row_step = max(ctr.new_tokens / max(ctr.live_row_steps, 1), 1.0)
        if self.row_costs is None:
            self.row_costs = measure_row_costs(self)
        return prefer_masking(self.row_costs, self.width - m, movers, left / tokens_per_row_step,
                              ctr.layer_evals / rows, ctr.head_evals / rows)

    def _append(self, n: int, new_tokens: Tensor, new_exits: Tensor, counts: Tensor, logprobs: Tensor):
        """Write the step's tokens [n, c] (``counts`` [n] valid per row; ``logprobs`` [n, c])
        into the live rows, cut at EOS / max_new_tokens. One device->host copy (on a GPU the
        float64 log-probabilities travel as int64 bit patterns); the cuts are made on host
        lists (n rows of at most d + 1 tokens). Returns (events of the live rows, slots that
        finished)."""
        if new_tokens.dim() == 1:  # one token per row ([n] tensors)
            if not self.eos_set and not self.num_masked:
                return self._append_one(n, new_tokens, new_exits, logprobs)
            new_tokens, new_exits, logprobs = new_tokens.unsqueeze(1), new_exits.unsqueeze(1), logprobs.unsqueeze(1)
        c = new_tokens.shape[1]
        self.next_input = self._min_left = None
        # 1. the whole c-wide block into the device buffer at length .. length + c - 1 (columns
        #    past a row's kept tokens are never read before a later step rewrites them; they
        #    stay below T: c <= draft_len + 1, the cache's slack)
        dev = self.device
        length = self.length[:n]
        cols = length.to(dev).unsqueeze(1) + self._arange[:c].unsqueeze(0)
        self.tokens[:n].scatter_(1, cols, new_tokens)
        # 2. the cuts, on the host
        on_host = dev.type == "cpu"
        parts = [new_tokens, new_exits, counts.to(dev).unsqueeze(1)]
        if not on_host:
            parts.append(logprobs.to(torch.float64).view(torch.int64))
        host = torch.cat(parts, 1).cpu()
        rows = host.tolist()
        lps = logprobs.tolist() if on_host else host[:, 2 * c + 1:].view(torch.float64).tolist()
        room = (self.max_new[:n] - self.generated[:n]).tolist()
        dead = self.masked[:n].tolist() if self.num_masked else [False] * n
        eos = self.eos_set
        kept_list, events, finished = [0] * n, [], []
        ids = self.slot_ids
        exit_counts = list(self.counters.exit_counts)
        exit_sum = 0
        for i in range(n):
            if dead[i]:
                continue
            row = rows[i]
            kept = min(row[2 * c], room[i])
            toks = row[:kept]
            hit_eos = False
            if eos:
                for j, t in enumerate(toks):
                    if t in eos:
                        kept, hit_eos = j + 1, True
                        toks = toks[:kept]
                        break
            exits = row[c:c + kept]
            for e in exits:
                exit_counts[e] += 1
            exit_sum += sum(exits)
            kept_list[i] = kept
            done = hit_eos or kept == room[i]
            if done:
                finished.append(i)
            events.append(StepEvent(ids[i], toks, exits, done, ("eos" if hit_eos else "length") if done else None,
                                    lps[i][:kept]))
        kept_t = torch.tensor(kept_list, dtype=torch.int64)
        length += kept_t
        self.generated[:n] += kept_t
        ctr = self.counters
        ctr.new_tokens += sum(kept_list)
        ctr.exit_sum += exit_sum
        ctr.exit_counts = exit_counts
        return events, finished

    def _append_one(self, n: int, tokens: Tensor, exits: Tensor, logprobs: Tensor):
        """``_append`` for one token per row, no EOS and no masked rows (the common decode
        step): fewer ops; a constant exit (``constant_exits``) is not copied back."""
        length = self.length[:n]
        self.tokens.index_put_((self._arange[:n], length.to(self.device)), tokens)
        k = self._step_exit
        if self.device.type == "cpu":
            tl, ll = tokens.tolist(), logprobs.tolist()
            el = [k] * n if k is not None else exits.tolist()
        else:  # the step's one device->host copy
            host = torch.stack([tokens, exits, logprobs.to(torch.float64).view(torch.int64)]).cpu()
            tl, el = host[:2].tolist()
            ll = host[2].view(torch.float64).tolist()
        self.next_input = (n, tokens)
        left = self._min_left
        if left is None:
            left = int((self.max_new[:n] - self.generated[:n]).min())
        length += 1
        generated = self.generated[:n]
        generated += 1
        if left > 1:  # no row finishes in this step
            finished = [False] * n
            self._min_left = left - 1
        else:
            finished = (generated >= self.max_new[:n]).tolist()
            self._min_left = None
        ctr = self.counters
        ctr.new_tokens += n
        exit_counts = list(ctr.exit_counts)
        if k is not None:
            ctr.exit_sum += k * n
            exit_counts[k] += n
        else:
            ctr.exit_sum += sum(el)
            for e in el:  # n small ints: a Python loop beats bincount + tolist
                exit_counts[e] += 1
        ctr.exit_counts = exit_counts
        ids = self.slot_ids
        events = [StepEvent(ids[i], [tl[i]], [el[i]], finished[i], "length" if finished[i] else None, [ll[i]])
                  for i in range(n)]
        return events, [i for i in range(n) if finished[i]]
