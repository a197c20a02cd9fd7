"""Per-phase times of self-speculative decoding against ``full`` (one batch, one exit).

Prompts: held-out test blocks of the checkpoint's run (random tokens for a random model).
Wraps the decode state's layer runner and the adapter's exit head with timers and splits each
self-speculative step into: draft layers (one position per row), draft heads, verify layers
(the deep layers over the d + 1 positions), verify head, and the rest (acceptance, sampling
set-up, bookkeeping, appending tokens). ``full`` steps are split the same way (layers, head,
rest). Times are per generated token (ms), medians over ``--rounds`` interleaved runs.

Usage: ``python bench/profile_self_speculative.py [--checkpoint runs/bench_lm/last.pt]
[--batch 8] [--exit 3] [--draft-len 4] [--draft-confidence P ...] [--draft-candidates K ...] [--new-tokens 32] [--rounds 3]
[--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ann_kernels.generation import DecodeState, ModeConfig, RowParams, as_adapter  # noqa: E402
from ann_kernels.generation.checkpoint import held_out_blocks  # noqa: E402
from bench.bench_generate import DEFAULT_CHECKPOINT, load_model  # noqa: E402


def timed_run(ad, config, prompts, new_tokens):
    """One generation with phase timers: (phase -> seconds, new tokens, steps)."""
    phases = defaultdict(float)
    st = DecodeState(ad, config, max_batch_size=len(prompts), max_positions=max(map(len, prompts)) + new_tokens)
    run_layers, exit_logits = st.run_layers, ad.exit_logits

    def layers_timer(layers, h, *a, **kw):
        t0 = time.perf_counter()
        out = run_layers(layers, h, *a, **kw)
        phases["verify layers" if h.shape[1] > 1 else "draft layers" if config.mode != "full" else "layers"] += \
            time.perf_counter() - t0
        return out

    def head_timer(h, exit_id):
        t0 = time.perf_counter()
        out = exit_logits(h, exit_id)
        phases["verify head" if h.dim() == 3 else "draft head" if config.mode != "full" else "head"] += \
            time.perf_counter() - t0
        return out

    st.add_rows(prompts, [RowParams(new_tokens)] * len(prompts), list(range(len(prompts))))
    st.run_layers, ad.exit_logits = layers_timer, head_timer
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            while st.num_rows:
                st.step()
            total = time.perf_counter() - t0
    finally:
        del ad.exit_logits
    phases["rest"] = total - sum(phases.values())
    phases["total"] = total
    return phases, st.counters.new_tokens, st.counters.steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--exit", type=int, default=3)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--draft-confidence", type=float, nargs="+", default=[],
                    help="also profile self_speculative with these draft_confidence values")
    ap.add_argument("--draft-candidates", type=int, nargs="+", default=[],
                    help="also profile self_speculative with these draft_candidates values")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, run_dir, _ = load_model(args.checkpoint)
    ad = as_adapter(model)
    if run_dir is not None:  # held-out text, as bench_generate.py
        prompts = held_out_blocks(run_dir, "test", args.prompt_len, args.batch).tolist()
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(1, ad.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    configs = {"full": ModeConfig("full"),
               "self_speculative": ModeConfig("self_speculative", exit_index=args.exit, draft_len=args.draft_len)}
    for c in args.draft_candidates:
        configs[f"self_speculative_k{c}"] = ModeConfig("self_speculative", exit_index=args.exit,
                                                       draft_len=args.draft_len, draft_candidates=c)
    for c in args.draft_confidence:
        configs[f"self_speculative_c{c:g}"] = ModeConfig("self_speculative", exit_index=args.exit,
                                                         draft_len=args.draft_len, draft_confidence=c)
    runs = {k: [] for k in configs}
    for name, cfg in configs.items():  # warm-up
        timed_run(ad, cfg, prompts, 4)
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            runs[name].append(timed_run(ad, cfg, prompts, args.new_tokens))
    print(f"batch {args.batch}, exit {args.exit}, draft_len {args.draft_len}, {args.new_tokens} new tokens, "
          f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    totals = {}
    for name, rs in runs.items():
        tokens, steps = rs[0][1], rs[0][2]
        keys = [k for k in rs[0][0] if k != "total"] + ["total"]
        per_tok = {k: statistics.median(r[0][k] for r in rs) * 1e3 / tokens for k in keys}
        totals[name] = per_tok["total"]
        print(f"  {name:22s} {steps} steps, {tokens / steps:.2f} tokens/step; ms per token: "
              + ", ".join(f"{k} {v:.3f}" for k, v in per_tok.items()))
    for name in totals:
        if name != "full":
            print(f"  {name} / full tokens/s: {totals['full'] / totals[name]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
