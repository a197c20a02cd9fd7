"""Chunked prefill of one joining prompt into a running :class:`DecodeState`, so the rows that
decode keep getting tokens while a long prompt is prefilled (Sarathi-Serve, Agrawal et al.
OSDI'24; vLLM's ``--enable-chunked-prefill``, whose scheduler also keeps one partial prefill at
a time by default: ``max_num_partial_prefills=1``).

The decode state prefills a joining row whole (``DecodeState.add_rows``); this module builds
the chunked version from the state's public pieces, without changing the engine:

1. the prompt's positions 0 .. L - 2 (the last prompt token is the input of the row's first
   decode step, as in ``add_rows``) are prefilled in chunks into a *reserved* slot, the
   cache's last one (``state.slots - 1``): ``DecodeState.run_layers`` over the chunk's
   positions, attending to the positions earlier chunks wrote (the causal mask on absolute
   positions, as ``DecodeState._prefill`` does for the whole prompt). The batch never uses
   that slot: its rows sit in slots 0 .. width - 1, compaction only moves rows down, and the
   caller keeps ``live rows + 1 <= slots`` (the slot is counted as taken) after compacting
   the state's finished rows away before the first chunk (``remove_rows([])``);
2. when every position is in, the row joins: ``add_rows`` with the last prompt token alone
   (registers the row's length, sampling and id; nothing to prefill), then
   ``copy_slots`` moves the reserved slot's cache and hidden states onto the new row (no copy
   when the batch is full and the row landed in the reserved slot itself), the row's tokens
   are the prompt and its ``length`` / ``seg_len`` are set to the whole prompt's.

Greedy tokens equal a whole-prompt prefill's (same keys and values up to the float rounding of
a different split of the query block; the tests compare against ``generate``).
"""

from __future__ import annotations

import time

import torch

from ann_kernels.generation.state import DecodeState, RowParams

__all__ = ["ChunkedPrefill"]


class ChunkedPrefill:
    """One prompt being prefilled in chunks into ``state``'s reserved last slot.

    Args:
        state: the decode state the row will join (its mode's batch).
        prompt: the prompt's token ids (>= 2: a one-token prompt has nothing to prefill).
        params, row_id: what ``add_rows`` gets when the row joins.
    """

    def __init__(self, state: DecodeState, prompt: list[int], params: RowParams, row_id) -> None:
        if len(prompt) < 2:
            raise ValueError(f"prompt: chunked prefill needs >= 2 tokens, got {len(prompt)}")
        self.state, self.prompt, self.params, self.row_id = state, list(prompt), params, row_id
        self.slot = state.slots - 1
        self.done = 0  # positions 0 .. done - 1 are in the reserved slot's cache
        self.total = len(prompt) - 1
        self.chunks = 0
        cfg = state.config
        self.last_seg = cfg.exit_index if cfg.mode == "static" else state.num_exits - 1
        state.remove_rows([])  # compact finished (masked) rows: the batch's width = its live rows

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @torch.inference_mode()
    def run_chunk(self, max_tokens: int) -> int:
        """Prefill the next at most ``max_tokens`` positions; returns how many."""
        st = self.state
        start, stop = self.done, min(self.done + max_tokens, self.total)
        if stop <= start:
            return 0
        t0 = time.perf_counter()
        # 1. the chunk's tokens into the reserved slot's token row (moved with the row at join)
        ids = torch.as_tensor(self.prompt[start:stop], dtype=torch.int64)
        st.tokens[self.slot, start:stop] = ids.to(st.device)
        # 2. its positions through every segment, reading the earlier chunks' keys and values
        qpos = torch.arange(start, stop, dtype=torch.int64).unsqueeze(0)  # [1, s] host
        h = st.adapter.embed(ids.to(st.device).unsqueeze(0), qpos.to(st.device))
        layers = st.segment_layers(0, self.last_seg)
        st.run_layers(layers, h, qpos, qpos, rows=self.slot, window=stop, force_mask=True)
        st.wait()
        ctr = st.counters
        ctr.prefill_s += time.perf_counter() - t0
        ctr.prefill_evals += float(stop - start) * len(layers)
        self.done = stop
        self.chunks += 1
        return stop - start

    @torch.inference_mode()
    def join(self) -> None:
        """Add the fully prefilled row to the batch (module docstring, step 2)."""
        if not self.finished:
            raise RuntimeError(f"chunked prefill: {self.done} of {self.total} positions done; cannot join yet")
        st, length = self.state, len(self.prompt)
        if st.num_rows > self.slot:
            raise RuntimeError(f"chunked prefill: {st.num_rows} live rows; the row cannot join below or at its "
                               f"reserved slot {self.slot}")
        # add_rows puts the row after the live ones: below the reserved slot, or (every other
        # slot taken) in it, where its one-token prompt prefills nothing and the cache stays
        st.add_rows([self.prompt[-1:]], [self.params], [self.row_id])
        dst = st.width - 1
        if dst != self.slot:
            st.copy_slots(torch.tensor([self.slot], device=st.device), torch.tensor([dst], device=st.device))
        st.tokens[dst, :length] = torch.as_tensor(self.prompt, dtype=torch.int64).to(st.device)
        st.length[dst] = length
        st.seg_len[dst, : self.last_seg + 1] = length - 1
        st.counters.prefill_tokens += length - 1  # add_rows counted the last token
        if st.candidates is not None:
            st.candidates[torch.as_tensor(self.prompt, device=st.device)] = True
